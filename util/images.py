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


# Start-of-frame markers of 8-bit Huffman-coded JPEGs: baseline, extended, progressive.
_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)


def plain_jpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) of an 8-bit Huffman-coded JPEG with 1 or 3 components (grey or colour: what
    torchvision's decoder reads exactly as Pillow does), from its frame header; None for any other
    file, CMYK and arithmetic-coded JPEGs included. Pillow's parse of the whole header costs about
    100 us, as much as decoding a CIFAR-sized image; walking the segments to the frame header costs
    a few."""
    if data[:2] != b"\xff\xd8":
        return None
    pos, end = 2, len(data)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a start of frame
            if marker not in _HUFFMAN_FRAMES or pos + 10 > end:
                return None
            precision, components = data[pos + 4], data[pos + 9]
            height = int.from_bytes(data[pos + 5 : pos + 7], "big")
            width = int.from_bytes(data[pos + 7 : pos + 9], "big")
            ok = precision == 8 and components in (1, 3) and width > 0 and height > 0
            return (width, height) if ok else None
        if marker == 0xDA:  # start of scan before any frame header
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None
