"""Work-arounds for incompatibilities between the newest releases of our dependencies.

Each one says what broke and is a no-op where nothing is broken.
"""

from PIL import Image, ImageOps
from timm.data import auto_augment


def _posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        # Keeping 0 bits zeroes every channel, which Pillow < 13 did; Pillow 13 raises instead.
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def patch_timm_posterize() -> None:
    """timm's RandAugment 'PosterizeIncreasing' reaches 0 bits at magnitude 10, which Pillow 13
    rejects ("bits must be between or equal to 1 and 8"), killing a data worker mid-run."""
    for name in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal"):
        if name in auto_augment.NAME_TO_OP:
            auto_augment.NAME_TO_OP[name] = _posterize


patch_timm_posterize()
