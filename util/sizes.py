"""Image sizes as the flags and the models take them: one side (a square) or (height, width)."""

import numbers
from collections.abc import Sequence

from util.cli.errors import fail

MAX_SIDE = 2**20  # pixels a side; why: image_size


def image_size(input_size: int | Sequence[int]) -> tuple[int, int]:
    """(height, width) of an ``--input_size`` value: one side (a square) or (height, width), each at
    most ``MAX_SIDE`` pixels. Up to that bound every tensor a size implies stays within torch's 64-bit
    size arithmetic (at patch 2, the smallest here, a 2**20-px square is 2.7e11 tokens), so the
    memory checks (util/memory.py) say in GiB what does not fit; beyond it that arithmetic overflows
    before they run (``--input_size 1000000000`` at patch 4 is 6e16 tokens: building the model
    raised "Storage size calculation overflowed")."""
    if isinstance(input_size, numbers.Integral):  # numpy's integers too
        values = [int(input_size)]
    else:
        values = [int(v) for v in input_size]
    if len(values) not in (1, 2):
        shown = " ".join(map(str, values))
        fail(f"--input_size takes one value (a square) or two (height width), got {len(values)}: {shown}")
    if max(values) > MAX_SIDE:
        fail(
            f"--input_size {' '.join(map(str, values))} is more than {MAX_SIDE} pixels a side, beyond what any "
            f"model here can take; give a smaller --input_size"
        )
    return values[0], values[-1]


def shown_size(input_size: int | Sequence[int]) -> str:
    """An ``--input_size`` value as the flag takes it: ``224`` for a square, else ``224 160``."""
    height, width = image_size(input_size)
    return f"{height}" if height == width else f"{height} {width}"


def check_input_size(input_size: int | Sequence[int], patch_size: int, source: str = "") -> tuple[int, int]:
    """(height, width), both multiples of the patch size, or a one-line error. ``source`` names the
    checkpoint the size was read from; without it, the size is the user's flag."""
    height, width = image_size(input_size)
    if any(side < patch_size or side % patch_size for side in (height, width)):
        shown = f"{height}" if height == width else f"{height} {width} (height width)"
        if source:
            fail(
                f"{source} stores --input_size {shown}, not a multiple of the model's patch size {patch_size}; "
                f"give --input_size, or a --model of a patch size that divides it"  # (a --model given against its own)
            )
        sides = (height,) if height == width else (height, width)
        nearest = " ".join(str(max(round(side / patch_size), 1) * patch_size) for side in sides)
        fail(
            f"--input_size {shown} is not a multiple of the model's patch size {patch_size}; "
            f"give multiples of it, such as --input_size {nearest}"
        )
    return height, width
