"""Vision Transformer classifiers for fine-tuning and linear probing MAE encoders.

timm's ``VisionTransformer`` with the official MAE option ``global_pool``: ``True`` averages the
patch tokens and applies ``fc_norm`` (the final ``norm`` is then absent), ``False`` takes the
class token after ``norm``. timm's own strings ('avg', 'token') are accepted too. Parameter
names equal the official fine-tuned checkpoints'.
"""

from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

from util.registry import Registry


class VisionTransformer(TimmVisionTransformer):
    def __init__(self, global_pool: bool | str = False, **kwargs):
        if isinstance(global_pool, bool):
            global_pool = "avg" if global_pool else "token"
        kwargs.setdefault("qkv_bias", True)
        kwargs.setdefault("norm_layer", partial(nn.LayerNorm, eps=1e-6))
        super().__init__(global_pool=global_pool, **kwargs)
        # The official classifier adds fc_norm after timm built the head; register it last too,
        # so that parameter (and optimizer-state) order equals the official checkpoints'.
        self.fc_norm = self._modules.pop("fc_norm")


def vit_tiny_patch16(**kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=16, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_tiny_patch4(**kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 32)
    return VisionTransformer(patch_size=4, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_tiny_patch2(**kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 32)
    return VisionTransformer(patch_size=2, embed_dim=192, depth=12, num_heads=3, **kwargs)


def vit_mini_patch4(**kwargs) -> VisionTransformer:
    kwargs.setdefault("img_size", 32)
    return VisionTransformer(patch_size=4, embed_dim=128, depth=6, num_heads=4, **kwargs)


def vit_base_patch16(**kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=16, embed_dim=768, depth=12, num_heads=12, **kwargs)


def vit_large_patch16(**kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **kwargs)


def vit_huge_patch14(**kwargs) -> VisionTransformer:
    return VisionTransformer(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **kwargs)


MODELS = Registry(
    [
        vit_tiny_patch16,
        vit_tiny_patch4,
        vit_tiny_patch2,
        vit_mini_patch4,
        vit_base_patch16,
        vit_large_patch16,
        vit_huge_patch14,
    ]
)
create_model = MODELS.create  # (name, input_size, in_chans, **kwargs): checks --model, --input_size, --in_chans

# What a state dict may hold beside an encoder: an MAE's decoder and mask token, a classifier's head.
NOT_ENCODER = ("decoder_", "mask_token", "head.")


def encoder_for_weights(
    state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None, **kwargs: Any
) -> tuple[str, int | tuple[int, int]] | None:
    """(name, image size) of the classifier whose encoder has exactly the shapes of ``state``'s encoder
    weights (an MAE's, an encoder-only release's or a classifier's: what ``NOT_ENCODER`` names is set
    aside), pooled as they are (``fc_norm``: global pooling); or None. See ``Registry.fit``."""
    encoder = {k: v for k, v in state.items() if not k.startswith(NOT_ENCODER)}
    return MODELS.fit(encoder, names, num_classes=0, global_pool="fc_norm.weight" in encoder, **kwargs)
