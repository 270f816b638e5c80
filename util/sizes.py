"""Image sizes as the flags and the models take them: one side (a square) or (height, width)."""

import numbers
from collections.abc import Sequence

from util.cli.errors import fail


def image_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an ``--input_size`` value: one side (a square) or (height, width)."""
    if isinstance(input_size, numbers.Integral):  # numpy's integers too
        return int(input_size), int(input_size)
    values = [int(v) for v in input_size]
    if len(values) not in (1, 2):
        shown = " ".join(map(str, values))
        fail(f"--input_size takes one value (a square) or two (height width), got {len(values)}: {shown}")
    return values[0], values[-1]


def shown_size(input_size: int | Sequence[int]) -> str:
    """An ``--input_size`` value as the flag takes it: ``224`` for a square, else ``224 160``."""
    height, width = image_size(input_size)
    return f"{height}" if height == width else f"{height} {width}"


def check_input_size(input_size: int | Sequence[int], patch_size: int) -> tuple[int, int]:
    """(height, width), both multiples of the patch size, or a one-line error."""
    height, width = image_size(input_size)
    if any(side < patch_size or side % patch_size for side in (height, width)):
        shown = f"{height}" if height == width else f"{height} {width} (height width)"
        fail(f"--input_size {shown} is not a multiple of the model's patch size {patch_size}")
    return height, width
