"""Fixed 2-D sine-cosine position embeddings and their resizing.

The formula is the one of "Attention Is All You Need" applied separately to the row and the
column coordinate (MoCo v3 / MAE): half of the channels encode the column, half the row, and
within each half the first quarter holds sines and the second cosines.
"""

import math
from collections.abc import Sequence

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed

from util.memory import require
from util.sizes import image_size


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim] embedding: sin(pos * w_k) then cos(pos * w_k), w_k = 10000^(-2k/dim)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {dim}")
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | Sequence[int], cls_token: bool = False) -> np.ndarray:
    """[rows * cols (+1), embed_dim] embedding for a grid of ``grid_size`` (one side, or (rows, columns))
    in row-major order, as the patch embedding flattens it; ``cls_token``: a zero row first."""
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    h, w = image_size(grid_size)
    # Computed in float64 on the CPU, whatever device the model is built on (the meta device too):
    # the two halves and their concatenation are the peak, 16 bytes per element.
    shape = (h * w + int(cls_token), embed_dim)
    what = f"the {shape} sin-cos position embedding of a {h}x{w} patch grid"
    require(16 * shape[0] * embed_dim, what, "give a smaller --input_size")
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb.astype(np.float32)


def resize_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | Sequence[int],
    num_prefix_tokens: int = 1,
    old_grid: int | Sequence[int] | None = None,
) -> torch.Tensor:
    """Resize a [1, prefix + h*w, D] position embedding to a new grid (one side, or (rows,
    columns)), bicubic without antialiasing as the official code does; prefix tokens are kept.
    The token count alone cannot tell a 16x8 grid from an 8x16 one: without ``old_grid`` the old
    grid is taken as square."""
    tokens = pos_embed.shape[1] - num_prefix_tokens
    new_h, new_w = image_size(new_grid)
    if old_grid is None:
        if tokens == new_h * new_w:
            return pos_embed  # already fits: nothing to resize, whatever its shape
        side = math.isqrt(max(tokens, 0))  # of an untrusted count: none or fewer than none (sqrt(-1) is complex)
        if side < 1 or side * side != tokens:
            raise ValueError(f"position embedding has {tokens} grid tokens, not a square grid")
        old_grid = side
    old_h, old_w = image_size(old_grid)
    if old_h * old_w != tokens:
        raise ValueError(f"position embedding has {tokens} grid tokens, not a {old_h}x{old_w} grid")
    # timm's resampling (bicubic in float32, cast back; none at the same grid; align_corners left to
    # F.interpolate's False, which timm before 1.0.31 cannot be told) is the official interpolation.
    new, old = [new_h, new_w], [old_h, old_w]
    return resample_abs_pos_embed(pos_embed, new, old, num_prefix_tokens, antialias=False)


# The official module's names, which derived projects call to build and to load MAE encoders
# (``grid_size`` may also be (rows, columns) here).
get_2d_sincos_pos_embed = sincos_2d


def interpolate_pos_embed(model: torch.nn.Module, checkpoint_model: dict[str, torch.Tensor]) -> None:
    """Official name: resize ``checkpoint_model['pos_embed']``, in place, to ``model``'s grid (the
    checkpoint's grid taken as square, as every official one is), keeping its class token."""
    if "pos_embed" in checkpoint_model:
        num_patches = model.patch_embed.num_patches
        num_prefix_tokens = model.pos_embed.shape[-2] - num_patches
        grid = getattr(model.patch_embed, "grid_size", None) or int(round(num_patches**0.5))
        checkpoint_model["pos_embed"] = resize_pos_embed(checkpoint_model["pos_embed"], grid, num_prefix_tokens)
