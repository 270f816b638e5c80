"""Reading image files as RGB, eagerly or lazily, naming the file when it cannot be read; and
reading them with their own channels (``--in_chans`` other than 3) as float tensors in [0, 1]."""

import os
import re

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from util.cli.errors import UserError, fail

# torchvision's decoders begin their errors with the C++ source line that raised them:
# "decode_jpeg, /…/torchvision/csrc/io/image/cpu/decode_jpeg.cpp:171, Image is incomplete or truncated".
_SOURCE_LOCATION = re.compile(r"^\w+, \S+\.(?:cpp|cu|h):\d+, ")


def decoder_reason(error: BaseException) -> str:
    """What a decoder said about a file, without the C++ source location torchvision puts first."""
    return _SOURCE_LOCATION.sub("", str(error))


def unreadable(path: str, error: BaseException, hint: str = "") -> str:
    """The one-line error for an image file that cannot be read. Pillow's error for a file it cannot
    identify shows Python's repr of the open file, and says nothing the path does not: it is put in words.
    A data set's file that is gone was listed when the command started (files given on the command line
    are checked before): it was removed or moved since, and "remove or replace the file" fits no longer."""
    if isinstance(error, FileNotFoundError) and os.path.islink(path):
        # A dangling link is listed by a folder's scan like any file, but was never readable: "gone since" and
        # "start again, which lists the data afresh" would list it again and fail on it again.
        return (
            f"image {path} is a link to {os.path.realpath(path)}, which does not exist; remove the link, "
            f"or put the file it points to back"
        )
    if isinstance(error, FileNotFoundError):
        return (
            f"image {path} is gone: it was listed when the run started, and removed or moved since; put it back, "
            f"or start again (a training run with --resume auto), which lists the data afresh"
        )
    if isinstance(error, UnidentifiedImageError):
        reason = "not an image Pillow can read: another format, or its start is damaged"
    else:
        reason = f"{type(error).__name__}: {decoder_reason(error)}"
    advice = "make it readable, or remove it" if isinstance(error, PermissionError) else "remove or replace the file"
    return f"cannot read image {path} ({reason}){hint}; {advice}"


def load_rgb(path: str) -> Image.Image:
    """Open an image as RGB (grayscale, CMYK, palette and alpha are converted), naming the file on failure."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
    except Exception as e:  # PIL raises many types for bad files
        fail(unreadable(path, e))
    return to_rgb(img, f"image {path}")


def to_rgb(img: Image.Image, name: str = "it") -> Image.Image:
    """RGB from any mode: palette with transparency via RGBA, 16-bit integer images scaled to 8 bits
    (Pillow's convert would clip them to 255). Float and 32-bit integer pixels have no depth to scale
    by (Pillow would make them black or clip them): a one-line error that starts with ``name``."""
    if (problem := depth_problem(img)) is not None:
        fail(f"{name} {problem}")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif img.mode.startswith("I"):
        # 16-bit values whatever their range (depth_problem refused wider ones): a dark 16-bit PGM,
        # which Pillow reads as mode I, is not an 8-bit image because its values stay below 256.
        values = np.asarray(img).astype(np.float64)
        img = Image.fromarray((values * (255.0 / 65535.0)).round().clip(0, 255).astype(np.uint8))
    return img.convert("RGB")


# Other channel counts. Pillow holds at most 4 bands per image and 16 bits only for one band, so
# more channels come from a multi-page TIFF, one page per channel: the layout Pillow reads back
# at full depth (a TIFF of 5 bands in one page it cannot open at all).
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_TIFF_BITS_PER_SAMPLE = 258


def load_channels(path: str, in_chans: int, fixed_by: str = "") -> torch.Tensor:
    """Float32 [in_chans, H, W] in [0, 1], each value divided by the largest its bit depth (1, 8 or
    16 bits) holds. A multi-page TIFF gives one channel per page; any other file its bands (a palette
    its colours; alpha is dropped when that leaves ``in_chans``). Another channel count is an error;
    ``fixed_by`` names what set ``in_chans`` where no flag can change it (the checkpoint reconstruct.py
    reads, or a run resumes)."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            if img.format == "TIFF" and getattr(img, "n_frames", 1) > 1:
                channels = _tiff_pages(img, path)
                what = f"{len(channels)} pages, one channel each"
            else:  # other multi-frame formats (GIF, APNG, MPO) are read at their first frame, as for RGB
                img.load()
                channels, what = _bands(img, path, in_chans)
    except UserError:
        raise
    except Exception as e:  # Pillow raises many types for bad files
        hint = ""
        if path.lower().endswith((".tif", ".tiff")):
            hint = " (a TIFF of more than 4 bands per page cannot be read: store one channel per page)"
        fail(unreadable(path, e, hint))
    if len(channels) != in_chans:
        if in_chans == 1:
            todo = "keep one page per file" if "pages" in what else "convert it to grayscale (mode L or I;16)"
        else:
            todo = f"store it as a {in_chans}-page TIFF, one channel per page"
        if fixed_by:  # another --in_chans would be refused: the model's weights take these channels only
            fail(f"image {path} has {len(channels)} channel(s) ({what}) but {fixed_by} takes {in_chans}; {todo}")
        todo += f", or give --in_chans {len(channels)}"
        fail(f"image {path} has {len(channels)} channel(s) ({what}) but --in_chans is {in_chans}; {todo}")
    sizes = sorted({c.shape for c in channels})
    if len(sizes) > 1:
        fail(f"image {path}: its pages differ in size ({sizes[0]} and {sizes[-1]}); give every channel one size")
    return torch.from_numpy(np.stack(channels))


def _tiff_pages(img: Image.Image, path: str) -> list[np.ndarray]:
    pages = []
    for index in range(img.n_frames):
        img.seek(index)
        img.load()
        if len(img.getbands()) != 1:
            fail(
                f"image {path}: page {index} has {len(img.getbands())} bands (mode {img.mode}); a multi-page TIFF "
                f"is read as one channel per page: store each channel as a grayscale page"
            )
        pages.append(_scaled(img, path))
    return pages


def _bands(img: Image.Image, path: str, in_chans: int) -> tuple[list[np.ndarray], str]:
    if img.mode == "P":  # the palette's colours are the pixels
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode == "PA":
        img = img.convert("RGBA")
    what = f"mode {img.mode}"
    if img.mode in _ALPHA_MODES and len(img.getbands()) - 1 == in_chans:
        img = img.convert(img.mode[:-1].upper())  # drop alpha, as reading RGB does
    if len(img.getbands()) == 1:
        return [_scaled(img, path)], what
    return [_scaled(band, path) for band in img.split()], what


def _scaled(img: Image.Image, path: str) -> np.ndarray:
    """One band as float32 in [0, 1], divided by the largest value of its bit depth."""
    if (problem := depth_problem(img)) is not None:
        fail(f"image {path} {problem}")
    values = np.asarray(img)
    if img.mode == "1":
        return values.astype(np.float32)
    if values.dtype == np.uint8:
        return values.astype(np.float32) / 255.0
    return values.astype(np.float32) / 65535.0  # I;16, I;16B, ... and 16-bit data held as I


def depth_problem(img: Image.Image) -> str | None:
    """Why the pixels of ``img`` cannot be scaled to [0, 1] (float, integers beyond 16 bits), or None.
    Pillow reads 16-bit PGM/PPM and some 16-bit files as 32-bit integers (mode I): those pass."""
    if not img.mode.startswith(("F", "I")):  # 1 and 8-bit modes
        return None
    values = np.asarray(img)
    if values.dtype.kind == "u" and values.dtype.itemsize == 2:  # I;16, I;16B, ...
        return None
    if img.mode == "I":
        bits = img.tag_v2.get(_TIFF_BITS_PER_SAMPLE) if hasattr(img, "tag_v2") else None
        bits = bits[0] if isinstance(bits, tuple) else bits
        if (bits is None or bits <= 16) and values.size and 0 <= values.min() and values.max() <= 65535:
            return None
    return (
        f"holds {img.mode} pixels ({values.dtype}), which have no 8 or 16-bit depth to scale by; "
        f"store it as 8 or 16-bit unsigned integers"
    )


# Start-of-frame markers of 8-bit Huffman-coded JPEGs: baseline, extended, progressive.
_HUFFMAN_FRAMES = (0xC0, 0xC1, 0xC2)


def plain_jpeg_size(data: bytes | bytearray) -> tuple[int, int] | None:
    """(width, height) of an 8-bit Huffman-coded JPEG of 1 or 3 components (what torchvision's decoder
    reads exactly as Pillow does) from its frame header; None for any other file. At CIFAR size
    Pillow's parse of the whole header costs as much as the decode; walking the segments to the frame
    header costs next to nothing (benchmarks/README.md, "Where the loader's time goes")."""
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
