"""Loading an MAE encoder (ours or official; full MAE or encoder only) into a ViT classifier or an MAE."""

import argparse

import torch
from timm.layers import trunc_normal_
from timm.models import adapt_input_conv

from util.checkpoint.load import StateDict, model_state
from util.checkpoint.opening import Opened, open_checkpoint
from util.checkpoint.weights import check_weights, state_difference
from util.cli.errors import fail
from util.cli.log import log
from util.memory import require
from util.pos_embed import resize_pos_embed
from util.sizes import image_size

_DECODER_PREFIXES = ("decoder_", "mask_token")
_FINAL_NORM, _FC_NORM = {"norm.weight", "norm.bias"}, {"fc_norm.weight", "fc_norm.bias"}


def load_pretrained_encoder(model: torch.nn.Module, source: Opened | str, head_init_std: float = 2e-5) -> None:
    """Load the encoder of checkpoint ``source`` (opened, or a path) into a ``models_vit.VisionTransformer``
    (see ``_load_encoder``); a head it lacks is initialised with trunc-normal(``head_init_std``)."""
    source = source if isinstance(source, Opened) else open_checkpoint(source)
    missing = _load_encoder(model, source, classifier=True)
    if "head.weight" in missing:
        trunc_normal_(model.head.weight, std=head_init_std)
        torch.nn.init.zeros_(model.head.bias)
    log.info(f"loaded pre-trained encoder from {source.path}; initialised: {sorted(missing) or 'nothing'}")


def load_mae_encoder(model: torch.nn.Module, source: Opened | str) -> None:
    """Load the encoder of checkpoint ``source`` (opened, or a path) into a ``models_mae.MaskedAutoencoderViT``,
    leaving its decoder as it is, to read features of any MAE encoder (ours, official, encoder-only or a
    classifier with the final ``norm``)."""
    _load_encoder(model, source if isinstance(source, Opened) else open_checkpoint(source), classifier=False)


def _load_encoder(model: torch.nn.Module, source: Opened, classifier: bool) -> set[str]:
    """Load the encoder of checkpoint ``source`` into ``model``, a classifier (``--finetune``) or an
    MAE; return the model's keys it lacked. The decoder, mask token and a head the model cannot take
    (``_drop_other_heads``) are dropped, the position embedding resized and, for a classifier, the patch
    embedding adapted to its channels."""
    flag, path = "--finetune" if classifier else "checkpoint", source.path
    state = {k: v for k, v in model_state(source.ckpt, path).items() if not k.startswith(_DECODER_PREFIXES)}
    own = model.state_dict()
    check_weights(own, state, f"{flag} {path}")  # before anything is computed from them
    if classifier:
        adapt_input_channels(state, model.patch_embed.proj.in_channels, path)
    _drop_other_heads(state, own, path)
    if "pos_embed" in state:
        state["pos_embed"] = fit_pos_embed(model, source, state, flag)
    pooled = "fc_norm.weight" in state and "norm.weight" in own and "norm.weight" not in state
    fine_tuned = f"{flag} {path} was fine-tuned with --global_pool: it has fc_norm, not"
    if classifier:  # only the head and fc_norm may be missing and, with global pooling, the final norm left over
        may_miss = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
        may_be_left = set() if "norm.weight" in own else _FINAL_NORM
    else:  # every encoder weight must be there; other entries are ignored
        may_miss, may_be_left = {k for k in own if k.startswith(_DECODER_PREFIXES)}, None
        if missing := sorted(set(own) - set(state) - may_miss):
            if set(missing) <= _FINAL_NORM and pooled:
                fail(
                    f"{fine_tuned} the encoder's final norm that MAE features are read after; give its pre-trained "
                    f"checkpoint, or one fine-tuned with --cls_token"
                )
            fail(f"{flag} {path} lacks encoder weights {missing[:4]}; check --model and that it holds an MAE encoder")
    if diff := state_difference(own, state, may_miss, may_be_left):
        # Only the pooling differs: a class-token classifier (main_linprobe.py's default) of a global-pool
        # fine-tuned checkpoint (the official mae_finetuned_* releases).
        if classifier and pooled and not state_difference(own, state, may_miss | _FINAL_NORM, _FC_NORM):
            fail(
                f"{fine_tuned} the final norm that the class token is read after (--cls_token); give --global_pool, or "
                f"the pre-trained MAE checkpoint it was fine-tuned from"
            )
        name = type(model).__name__
        fail(f"{flag} {path} does not fit {name} ({diff}); check --model and that it is an MAE checkpoint")
    model.load_state_dict(state, strict=False)
    return set(own) - set(state)


def _drop_other_heads(state: StateDict, own: StateDict, path: str) -> None:
    """Drop from ``state``, in place, a head the model cannot take: a classifier's of another shape (other classes),
    and a linear probe's (BatchNorm then linear: head.0.*, head.1.*), a head of another kind. The encoder is the
    pre-trained one all the same; kept, the probe's keys were refused as "not an MAE checkpoint"."""
    for k in ("head.weight", "head.bias"):
        if k in state and k in own and state[k].shape != own[k].shape:
            log.info(f"dropping {k} of shape {tuple(state[k].shape)} from {path}: the model's is {tuple(own[k].shape)}")
            del state[k]
    if probe_head := sorted(k for k in state if k.startswith(("head.0.", "head.1.")) and k not in own):
        log.info(f"dropping the linear probe's head of {path} ({', '.join(probe_head)})")
        for k in probe_head:
            del state[k]


def fit_pos_embed(model: torch.nn.Module, source: Opened, state: StateDict, flag: str) -> torch.Tensor:
    """The position embedding of ``state`` (from ``source``) resized (bicubic) to the model's grid; as
    it is where the width differs (another model: the shape check names it)."""
    pos, own, path = state["pos_embed"], model.state_dict()["pos_embed"], source.path
    grid, prefix = tuple(model.patch_embed.grid_size), getattr(model, "num_prefix_tokens", 1)
    old = saved_grid(source.args, state, prefix)
    # Shapes alone miss a transposed grid (8x16 and 16x8 have as many tokens): compare grids too. One of
    # other dimensions ([tokens, width]) is no grid to resize: the shape check names it.
    if pos.dim() != own.dim() or pos.shape[-1] != own.shape[-1] or (pos.shape == own.shape and old in (None, grid)):
        return pos
    log.info(f"resizing pos_embed {tuple(pos.shape)} -> {tuple(own.shape)} (grid {grid})")
    # The interpolation works on float32 copies of the old and the new grid, each reshaped once more.
    require(
        2 * 4 * (pos[0].numel() + own[0].numel()),
        f"resizing the position embedding {tuple(pos.shape)} of {flag} {path}",
        f"check that it is a checkpoint of this --model (whose grid is {grid[0]}x{grid[1]})",
    )
    try:
        return resize_pos_embed(pos, grid, prefix, old)
    except ValueError as e:
        fail(f"{flag} {path}: {e}, and it stores no --input_size to tell its height and width")


def adapt_input_channels(state: StateDict, in_chans: int, path: str) -> None:
    """Fit the checkpoint's patch embedding to ``in_chans`` channels, in place. Only 3 -> 1 keeps what
    was learnt: the weights summed over channels give on a grayscale image the RGB model's output on
    it repeated in three channels."""
    weight = state.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4 or weight.shape[1] == in_chans:
        return
    if weight.shape[1] == 3 and in_chans == 1:
        state["patch_embed.proj.weight"] = adapt_input_conv(1, weight)
        log.info(f"--in_chans 1: summed the RGB patch-embedding weights of {path} over their 3 input channels")
        return
    fail(
        f"--finetune {path} was pre-trained on {weight.shape[1]}-channel images, this model takes --in_chans "
        f"{in_chans}; only 3 -> 1 is adapted (weights summed over channels): give --in_chans {weight.shape[1]} (the "
        f"weights'), or pre-train with --in_chans {in_chans}"
    )


def saved_grid(saved: argparse.Namespace | None, state: StateDict, num_prefix_tokens: int) -> tuple[int, int] | None:
    """(rows, columns) of the position-embedding grid of ``state``, from the ``--input_size`` it was
    ``saved`` with (the token count cannot tell 8x16 from 16x8); None if none fits: square, as official."""
    weight = state.get("patch_embed.proj.weight")
    if getattr(saved, "input_size", None) is None or weight is None:
        return None
    try:
        height, width = image_size(saved.input_size)
    except Exception:  # a value this code never wrote
        return None
    grid = (height // weight.shape[-1], width // weight.shape[-1])
    return grid if grid[0] * grid[1] == state["pos_embed"].shape[1] - num_prefix_tokens else None
