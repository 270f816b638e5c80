"""A faster pre-training augmentation with the official recipe's distribution.

The recipe (RandomResizedCrop(scale 0.2-1, bicubic) + flip) decodes the full JPEG and then
throws most pixels away: a 500x375 photo becomes 224x224. Here the crop box is drawn first,
with torchvision's own sampler, from the image's size alone; the JPEG is then decoded at the
largest DCT reduction (1/2, 1/4, 1/8) that still leaves at least the output resolution inside the
box (Pillow's draft mode), and crop + resize is one bicubic resize of the box. Images stay
uint8 until the device, where ``normalize_on_device`` converts them, so workers do not spend time
on float arithmetic and batches are 4x smaller to copy.
"""

import functools
import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from util.images import to_rgb

SCALE, RATIO = (0.2, 1.0), (3 / 4, 4 / 3)


class FastRandomResizedCropFlip:
    """PIL image (not yet decoded) -> uint8 tensor [3, size, size]."""

    def __init__(self, size: int, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO):
        self.size, self.scale, self.ratio = size, scale, ratio

    def __call__(self, img: Image.Image) -> torch.Tensor:
        top, left, h, w = transforms.RandomResizedCrop.get_params(img, list(self.scale), list(self.ratio))
        full_w, full_h = img.size
        # Largest power-of-two reduction that keeps the box at least `size` pixels on each side.
        reduce = 1
        while reduce < 8 and min(w, h) / (reduce * 2) >= self.size:
            reduce *= 2
        scale = 1
        if reduce > 1 and img.format == "JPEG":
            # Pillow picks the largest DCT scale s with size // requested >= s; asking for the
            # floor makes that our ``reduce``. Pixel k of the result covers pixels [k*s, (k+1)*s).
            img.draft("RGB", (full_w // reduce, full_h // reduce))
            scale = 2 ** round(math.log2(full_w / img.size[0]))
        img = to_rgb(img)
        box = (left / scale, top / scale, (left + w) / scale, (top + h) / scale)
        out = img.resize((self.size, self.size), Image.BICUBIC, box=box)
        if torch.rand(1).item() < 0.5:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy()).permute(2, 0, 1)


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
