"""A faster pre-training augmentation with the official recipe's distribution.

The recipe (RandomResizedCrop(scale 0.2-1, bicubic) + flip on PIL images) decodes the full JPEG,
resizes with Pillow and converts to float in the worker. Here the crop box is drawn first, from the
image's size alone. A JPEG whose box is at least twice the output on each side is decoded at the
largest DCT reduction (1/2, 1/4, 1/8) that keeps the output resolution inside the box (Pillow's
draft mode); other JPEGs are decoded by torchvision straight into a tensor. torch's antialiased
bicubic kernel for uint8, faster than Pillow's, resizes the box. Images stay uint8 until the device
(``normalization.normalize_on_device``): workers do no float arithmetic, batches are 4x smaller to
copy. What each step costs, measured: benchmarks/README.md.
"""

import io
import math
import random

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from util.data.images import plain_jpeg_size, to_rgb
from util.sizes import image_size

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; Pillow decodes once it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = None

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


class FastRandomResizedCropFlip:
    """Image file path -> uint8 tensor [3, height, width]; ``size``: one side or (height, width)."""

    def __init__(
        self, size: int | tuple[int, int], scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO
    ):
        self.size, self.scale, self.ratio = size, scale, ratio
        self.out_hw = image_size(size)

    def __call__(self, path: str) -> torch.Tensor:
        return self.crop(read_file(path))

    def crop(self, data: bytearray) -> torch.Tensor:
        """The crop of an image file's bytes."""
        jpeg_size = torchvision_jpeg_size(data)
        img = None if jpeg_size else Image.open(io.BytesIO(data))  # Pillow for all the rest
        top, left, h, w = random_crop_box(*(jpeg_size or img.size), self.scale, self.ratio)
        flip = random.random() < 0.5
        # Largest power-of-two reduction that keeps the box at least the output's size on each side.
        out_h, out_w = self.out_hw
        reduce = 1
        while reduce < 8 and h / (reduce * 2) >= out_h and w / (reduce * 2) >= out_w:
            reduce *= 2
        if reduce > 1 and (jpeg_size or img.format == "JPEG"):
            pixels, scale = _decode_reduced(img or Image.open(io.BytesIO(data)), reduce)
            # The box's edges in reduced pixels, rounded (at most half a reduced pixel off in a
            # box at least twice the output size) and kept inside the reduced image.
            top, left, h, w = _scale_box((top, left, h, w), scale, pixels.shape[1:])
        elif jpeg_size:
            pixels = decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            pixels = pil_to_tensor(to_rgb(img))
        box = pixels[:, top : top + h, left : left + w].unsqueeze(0)
        out = F.interpolate(box, size=self.out_hw, mode="bicubic", antialias=True).squeeze(0)
        return (out.flip(-1) if flip else out).contiguous()


def torchvision_jpeg_size(data: bytearray) -> tuple[int, int] | None:
    """(width, height) of a JPEG that torchvision decodes exactly as Pillow does; None for any other
    file, and beyond Pillow's decompression-bomb limit: Pillow refuses those rather than fill memory."""
    size = plain_jpeg_size(data) if decode_jpeg is not None else None
    limit = Image.MAX_IMAGE_PIXELS
    return None if size is None or (limit is not None and size[0] * size[1] > limit) else size


def read_file(path: str) -> bytearray:
    with open(path, "rb") as f:
        return bytearray(f.read())


def random_crop_box(
    width: int, height: int, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop as ``RandomResizedCrop.get_params`` draws it, from
    python's generator: torch's scalar operations made torchvision's sampler cost more per box
    than decoding a small JPEG."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * random.uniform(*scale)
        aspect = math.exp(random.uniform(*log_ratio))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    h, w = fallback_size(height, width, ratio)
    return (height - h) // 2, (width - w) // 2, h, w


def fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """(height, width) of get_params' central box when no try fits: the whole image, or its
    central part of the nearest allowed aspect ratio."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        return round(width / min(ratio)), width
    if in_ratio > max(ratio):
        return height, round(height * max(ratio))
    return height, width


def _decode_reduced(img: Image.Image, reduce: int) -> tuple[torch.Tensor, int]:
    """Decode at 1/reduce scale; returns the pixels and the scale Pillow actually used."""
    full_w, full_h = img.size
    # Pillow picks the largest DCT scale s with size // requested >= s; asking for the floor makes
    # that our ``reduce``. Pixel k of the result covers pixels [k*s, (k+1)*s), and a side of n
    # pixels becomes ceil(n / s).
    img.draft("RGB", (full_w // reduce, full_h // reduce))
    scale = next(s for s in (1, 2, 4, 8) if img.size == (-(-full_w // s), -(-full_h // s)))
    return pil_to_tensor(to_rgb(img)), scale


def _scale_box(box: tuple[int, int, int, int], scale: int, reduced_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, height, width) in full-size pixels -> the same in pixels ``scale`` times larger."""
    top, left, h, w = box
    rows, cols = reduced_hw
    top_r, left_r = min(round(top / scale), rows - 1), min(round(left / scale), cols - 1)
    bottom_r = min(rows, max(top_r + 1, round((top + h) / scale)))
    right_r = min(cols, max(left_r + 1, round((left + w) / scale)))
    return top_r, left_r, bottom_r - top_r, right_r - left_r
