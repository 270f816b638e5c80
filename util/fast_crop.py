"""A faster pre-training augmentation with the official recipe's distribution.

The recipe (RandomResizedCrop(scale 0.2-1, bicubic) + flip on PIL images) decodes the full JPEG,
resizes with Pillow and converts to float in the worker. Here the crop box is drawn first, with
torchvision's own sampler, from the image's size alone. A JPEG whose box is at least twice the
output on each side is decoded at the largest DCT reduction (1/2, 1/4, 1/8) that keeps the output
resolution inside the box (Pillow's draft mode); other JPEGs are decoded by torchvision straight
into a tensor. The box is then resized by torch's antialiased bicubic kernel for uint8, about
twice as fast as Pillow's. Images stay uint8 until the device, where ``normalize_on_device``
converts them, so workers do no float arithmetic and batches are 4x smaller to copy.
"""

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms

from util.images import to_rgb

try:  # deprecated since torchvision 0.29 in favour of TorchCodec; Pillow decodes once it is gone
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # pragma: no cover - depends on the installed torchvision
    decode_jpeg = None

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)
# JPEG modes that torchvision decodes exactly as Pillow does (CMYK and the rest go through Pillow).
_TORCHVISION_JPEG_MODES = ("RGB", "L")


class FastRandomResizedCropFlip:
    """PIL image (opened, not yet decoded) -> uint8 tensor [3, size, size]."""

    def __init__(self, size: int, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        # Largest power-of-two reduction that keeps the box at least `size` pixels on each side.
        reduce = 1
        while reduce < 8 and min(w, h) / (reduce * 2) >= self.size:
            reduce *= 2
        if img.format == "JPEG" and reduce > 1:
            pixels, scale = _decode_reduced(img, reduce)
            # The box in reduced pixels, rounded: at most half a reduced pixel off in a box at
            # least twice the output size.
            top, left = round(top / scale), round(left / scale)
            h, w = max(1, round(h / scale)), max(1, round(w / scale))
        elif decodes_with_torchvision(img):
            pixels = decode_jpeg(torch.frombuffer(read_bytes(img), dtype=torch.uint8), mode=ImageReadMode.RGB)
        else:
            pixels = _to_tensor(to_rgb(img))
        box = pixels[:, top : top + h, left : left + w].unsqueeze(0)
        out = F.interpolate(box, size=(self.size, self.size), mode="bicubic", antialias=True).squeeze(0)
        if torch.rand(1).item() < 0.5:
            out = out.flip(-1)
        return out.contiguous()


def _decode_reduced(img: Image.Image, reduce: int) -> tuple[torch.Tensor, int]:
    """Decode at 1/reduce scale; returns the pixels and the scale Pillow actually used."""
    full_w = img.size[0]
    # Pillow picks the largest DCT scale s with size // requested >= s; asking for the floor makes
    # that our ``reduce``. Pixel k of the result covers pixels [k*s, (k+1)*s).
    img.draft("RGB", (full_w // reduce, img.size[1] // reduce))
    scale = 2 ** round(math.log2(full_w / img.size[0]))
    return _to_tensor(to_rgb(img)), scale


def decodes_with_torchvision(img: Image.Image) -> bool:
    """Whether torchvision decodes this file (exactly as Pillow would)."""
    return decode_jpeg is not None and img.format == "JPEG" and img.mode in _TORCHVISION_JPEG_MODES


def read_bytes(img: Image.Image) -> bytearray:
    """The file behind a lazily opened image; closes the image."""
    img.fp.seek(0)
    data = bytearray(img.fp.read())
    img.close()
    return data


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_on_device(imgs: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> normalised float; float input is returned as it is."""
    if imgs.dtype != torch.uint8:
        return imgs
    mean_t, std_t = _constants(tuple(mean), tuple(std), imgs.device)
    return (imgs.float() - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _constants(mean: tuple, std: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a host-to-device copy at every step would synchronise the GPU."""
    mean_t = torch.tensor(mean, device=device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=device).view(1, -1, 1, 1) * 255
    return mean_t, std_t
