"""timm interop: what of a checkpoint is a timm ViT encoder, which of our models it is, and the
``timm.create_model`` call that loads it as export.py --to timm writes it (our encoders use timm's
names already, so nothing is renamed)."""

from typing import Any

import torch

import models_mae
import models_vit
from util.cli.errors import fail
from util.sizes import image_size

# Our classifier architectures as timm registered models (+ the kwargs that make them equal).
TIMM_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "vit_tiny_patch16": ("vit_tiny_patch16_224", {}),
    "vit_tiny_patch4": ("vit_tiny_patch16_224", {"patch_size": 4}),
    "vit_tiny_patch2": ("vit_tiny_patch16_224", {"patch_size": 2}),
    "vit_mini_patch4": ("vit_tiny_patch16_224", {"patch_size": 4, "embed_dim": 128, "depth": 6, "num_heads": 4}),
    "vit_base_patch16": ("vit_base_patch16_224", {}),
    "vit_large_patch16": ("vit_large_patch16_224", {}),
    "vit_huge_patch14": ("vit_huge_patch14_224", {}),
}
# What a timm ViT encoder holds; the rest of an MAE (decoder, mask token) and a head are left out.
_ENCODER_PREFIXES = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "fc_norm.")


def encoder_state(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """The encoder weights of an MAE or classifier state dict, under timm's ViT names (ours are
    timm's already), or fail naming what is missing or foreign."""
    foreign = sorted(k for k in state if not k.startswith(_ENCODER_PREFIXES + models_vit.NOT_ENCODER))
    if foreign:
        fail(f"checkpoint {path} holds weights that are not an MAE or ViT's ({', '.join(foreign[:3])})")
    encoder = {k: v for k, v in state.items() if k.startswith(_ENCODER_PREFIXES)}
    needed = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
    missing = [k for k in needed if k not in encoder]
    if "norm.weight" not in encoder and "fc_norm.weight" not in encoder:
        missing.append("norm.weight")
    if missing:
        fail(f"checkpoint {path} lacks encoder weights ({', '.join(missing)}); it is not an MAE or ViT checkpoint")
    return encoder


def vit_name(
    ckpt: dict[str, Any], encoder: dict[str, torch.Tensor], given: str | None, path: str
) -> tuple[str, int | tuple[int, int]]:
    """(models_vit name, image size) of the encoder: --model, else the checkpoint's args, else the
    architecture whose shapes equal the encoder's (depth, width and patch size tell them apart). The
    size is a square's side, or (height, width) where the checkpoint stores a rectangle that fits."""
    saved = getattr(ckpt.get("args"), "model", None)
    name = given or (models_mae.encoder_name(saved) if isinstance(saved, str) else None)
    if given:
        models_vit.MODELS.factory(given)  # a known name, or one line listing them
    elif name and name not in models_vit.MODELS:
        fail(f"checkpoint {path} stores --model {saved}, which has no models_vit classifier; give --model")
    # The stored rectangle first: one of as many patches as a square (48x12 at patch 4: 12x3, as 24x24's 6x6)
    # fits that square's shapes too, whose grid would place the position embeddings otherwise.
    names = [name] if name else None
    rectangle = _stored_rectangle(ckpt) if name else None
    found = rectangle and models_vit.encoder_for_weights(encoder, names, img_size=rectangle)
    found = found or models_vit.encoder_for_weights(encoder, names)
    if found:
        return found
    if name:
        which, advice = (f"--model {name}", "check") if given else (f"{name}, the model it stores", "give")
        fail(f"checkpoint {path} does not fit {which} (at any square image size); {advice} --model")
    fail(f"checkpoint {path}: no known ViT has its encoder's shapes; give --model")


def _stored_rectangle(ckpt: dict[str, Any]) -> tuple[int, int] | None:
    """The checkpoint's --input_size if (height, width) differ (weights alone cannot tell 8x16 patches from 16x8)."""
    stored = getattr(ckpt.get("args"), "input_size", None)  # checked when the checkpoint was loaded
    if stored is None:
        return None
    height, width = image_size(stored)
    return (height, width) if height != width else None


def timm_call(
    name: str, img_size: int | tuple[int, int], global_pool: bool, output: str, in_chans: int = 3
) -> str:  # printed, tested
    timm_name, kwargs = TIMM_NAMES[name]
    kwargs = dict(kwargs, **({"img_size": img_size} if img_size != 224 else {}))
    if in_chans != 3:  # timm builds 3 channels by default and would refuse the weights
        kwargs["in_chans"] = in_chans
    if global_pool:
        kwargs["global_pool"] = "avg"  # fc_norm after averaging, no final norm
    extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    return (
        f"timm.create_model({timm_name!r}{extra}, pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file={output!r}, custom_load=False))"
    )  # custom_load=False: a plain state dict, not the .npz some default configs name (timm < 1.0.31 keeps that)
