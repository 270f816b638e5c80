"""Loading an MAE encoder (ours or official; full MAE or encoder only) into a ViT classifier."""

import torch
from timm.layers import trunc_normal_

from util.checkpoint import load_checkpoint, model_state
from util.errors import fail
from util.pos_embed import resize_pos_embed

_DECODER_PREFIXES = ("decoder_", "mask_token")


def load_pretrained_encoder(model: torch.nn.Module, path: str, head_init_std: float = 2e-5) -> None:
    """Load the encoder weights of ``path`` into ``model`` (a ``models_vit.VisionTransformer``).

    The decoder and mask token are dropped, a head of another shape is dropped, the position
    embedding is resized (bicubic) when the resolution differs, and the head is initialised
    with trunc-normal(``head_init_std``) unless the checkpoint provided it. Only the head and
    ``fc_norm`` may be missing (and, with global pooling, the encoder's final ``norm`` is left
    over); anything else means the checkpoint does not belong to this model.
    """
    state = dict(model_state(load_checkpoint(path), path))
    own = model.state_dict()
    for key in [k for k in state if k.startswith(_DECODER_PREFIXES)]:
        del state[key]
    for key in ("head.weight", "head.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            print(
                f"dropping {key} of shape {tuple(state[key].shape)} from {path}: the model's is {tuple(own[key].shape)}"
            )
            del state[key]
    if "pos_embed" in state and state["pos_embed"].shape != own["pos_embed"].shape:
        grid = int(round((own["pos_embed"].shape[1] - model.num_prefix_tokens) ** 0.5))
        print(f"resizing pos_embed {tuple(state['pos_embed'].shape)} -> {tuple(own['pos_embed'].shape)}")
        state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, model.num_prefix_tokens)

    allowed_missing = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    allowed_unexpected = {"norm.weight", "norm.bias"} if "norm.weight" not in own else set()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing - allowed_missing or unexpected - allowed_unexpected or wrong_shape:
        problems = []
        if missing - allowed_missing:
            problems.append(f"missing {sorted(missing - allowed_missing)[:4]}")
        if unexpected - allowed_unexpected:
            problems.append(f"unexpected {sorted(unexpected - allowed_unexpected)[:4]}")
        if wrong_shape:
            problems.append(f"other shape {wrong_shape[:4]}")
        fail(
            f"--finetune {path} does not fit {type(model).__name__} "
            f"({'; '.join(problems)}); check --model and that it is an MAE checkpoint"
        )
    model.load_state_dict(state, strict=False)
    if "head.weight" in missing:
        trunc_normal_(model.head.weight, std=head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    print(f"loaded pre-trained encoder from {path}; initialised: {sorted(missing) or 'nothing'}")


def load_mae_encoder(model: torch.nn.Module, path: str) -> None:
    """Load the encoder weights of ``path`` into a ``models_mae.MaskedAutoencoderViT``, leaving its
    decoder as it is: for reading features of any MAE encoder (ours, the official full or
    encoder-only releases, or a classifier with the final ``norm``). Every encoder weight must be
    present with its shape (the position embedding is resized); other entries are ignored."""
    state = model_state(load_checkpoint(path), path)
    encoder = {k: v for k, v in model.state_dict().items() if not k.startswith(_DECODER_PREFIXES)}
    missing = sorted(set(encoder) - set(state))
    if missing:
        fail(f"checkpoint {path} lacks encoder weights {missing[:4]}; check --model and that it holds an MAE encoder")
    loaded = {k: state[k] for k in encoder}
    if loaded["pos_embed"].shape != encoder["pos_embed"].shape:
        loaded["pos_embed"] = resize_pos_embed(loaded["pos_embed"], int(round(model.num_patches**0.5)))
    wrong = sorted(k for k in encoder if loaded[k].shape != encoder[k].shape)
    if wrong:
        k = wrong[0]
        fail(f"checkpoint {path} does not fit --model: {k} is {tuple(loaded[k].shape)}, not {tuple(encoder[k].shape)}")
    model.load_state_dict(loaded, strict=False)
