"""Reading image files as RGB, eagerly or lazily, naming the file when it cannot be read."""

import numpy as np
from PIL import Image

from util.errors import fail


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (grayscale, CMYK, palette and alpha are converted), naming the file on failure."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises many types for bad files
        fail(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file")
    return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB from any mode: palette with transparency via RGBA, and 16/32-bit integer images scaled
    to 8 bits (Pillow's convert would clip them to 255)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode.startswith("I"):
        values = np.asarray(img).astype(np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
        img = Image.fromarray((values * (255.0 / peak)).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


def open_lazily(path: str) -> Image.Image:
    """Open without decoding (the size is read from the header), naming the file on failure."""
    try:
        img = Image.open(path)
    except Exception as e:
        fail(f"cannot read image {path} ({type(e).__name__}: {e}); remove or replace the file")
    return img
