"""Loading an MAE encoder (ours or official; full MAE or encoder only) into a ViT classifier."""

import argparse
from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv

from util.errors import fail
from util.pos_embed import resize_pos_embed
from util.safe_load import load_checkpoint, model_state
from util.shapes import image_size

_DECODER_PREFIXES = ("decoder_", "mask_token")


def load_pretrained_encoder(model: torch.nn.Module, path: str, head_init_std: float = 2e-5) -> None:
    """Load the encoder weights of ``path`` into ``model`` (a ``models_vit.VisionTransformer``).

    The decoder and mask token are dropped, a head of another shape is dropped, the position
    embedding is resized (bicubic) when the resolution differs, and the head is initialised
    with trunc-normal(``head_init_std``) unless the checkpoint provided it. Only the head and
    ``fc_norm`` may be missing (and, with global pooling, the encoder's final ``norm`` is left
    over); anything else means the checkpoint does not belong to this model.
    """
    ckpt = load_checkpoint(path)
    state = dict(model_state(ckpt, path))
    own = model.state_dict()
    for key in [k for k in state if k.startswith(_DECODER_PREFIXES)]:
        del state[key]
    adapt_input_channels(state, model.patch_embed.proj.in_channels, path)
    for key in ("head.weight", "head.bias"):
        if key in state and key in own and state[key].shape != own[key].shape:
            print(
                f"dropping {key} of shape {tuple(state[key].shape)} from {path}: the model's is {tuple(own[key].shape)}"
            )
            del state[key]
    grid = tuple(model.patch_embed.grid_size)
    old = saved_grid(ckpt, state, model.num_prefix_tokens) if "pos_embed" in state else None
    # Shapes alone miss a transposed grid (8x16 and 16x8 have as many tokens): compare grids too.
    if "pos_embed" in state and (state["pos_embed"].shape != own["pos_embed"].shape or old not in (None, grid)):
        print(f"resizing pos_embed {tuple(state['pos_embed'].shape)} -> {tuple(own['pos_embed'].shape)} (grid {grid})")
        try:
            state["pos_embed"] = resize_pos_embed(state["pos_embed"], grid, model.num_prefix_tokens, old)
        except ValueError as e:
            fail(f"--finetune {path}: {e}, and it stores no --input_size to tell its height and width")

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


def adapt_input_channels(state: dict[str, torch.Tensor], in_chans: int, path: str) -> None:
    """Fit the checkpoint's patch embedding to a model taking ``in_chans`` channels, in place.

    3 -> 1 sums the weights over the input channels (timm's ``adapt_input_conv``): on a grayscale
    image the result equals the RGB model's on that image repeated in three channels. Nothing else
    has an answer that keeps what was learnt, so any other difference is an error."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[1] == in_chans:
        return
    if weight.shape[1] == 3 and in_chans == 1:
        state["patch_embed.proj.weight"] = adapt_input_conv(1, weight)
        print(f"--in_chans 1: summed the RGB patch-embedding weights of {path} over their 3 input channels")
        return
    fail(
        f"--finetune {path} was pre-trained on {weight.shape[1]}-channel images, this model takes --in_chans "
        f"{in_chans}; only 3 -> 1 is adapted (weights summed over channels): pre-train with --in_chans {in_chans}"
    )


def saved_grid(ckpt: dict[str, Any], state: dict[str, torch.Tensor], num_prefix_tokens: int) -> tuple[int, int] | None:
    """(rows, columns) of the checkpoint's position-embedding grid, from the ``--input_size`` it
    stores (the token count alone cannot tell 8x16 from 16x8); None when it stores none that fits,
    and the grid is then taken as square (every official checkpoint's is)."""
    saved = ckpt.get("args")
    weight = state.get("patch_embed.proj.weight")
    if not isinstance(saved, argparse.Namespace) or getattr(saved, "input_size", None) is None or weight is None:
        return None
    try:
        height, width = image_size(saved.input_size)
    except Exception:  # a value this code never wrote
        return None
    patch = weight.shape[-1]
    grid = (height // patch, width // patch)
    return grid if grid[0] * grid[1] == state["pos_embed"].shape[1] - num_prefix_tokens else None


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
        loaded["pos_embed"] = resize_pos_embed(loaded["pos_embed"], model.grid_size)
    wrong = sorted(k for k in encoder if loaded[k].shape != encoder[k].shape)
    if wrong:
        k = wrong[0]
        fail(f"checkpoint {path} does not fit --model: {k} is {tuple(loaded[k].shape)}, not {tuple(encoder[k].shape)}")
    model.load_state_dict(loaded, strict=False)
