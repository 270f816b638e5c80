"""Image shapes other than square RGB: (height, width) sizes, and channel counts other than 3.

RGB images (``--in_chans 3``) keep the official PIL pipelines, given (height, width) sizes. Other
channel counts are read by ``util.data.images.load_channels`` as float tensors in [0, 1] and are
transformed as tensors: Pillow holds neither 16-bit images of several bands nor more than 4 bands.
"""

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as TF

from util.cli.errors import fail
from util.data.images import load_channels, load_rgb
from util.memory import require

BICUBIC = transforms.InterpolationMode.BICUBIC


def image_loader(in_chans: int, fixed_by: str = "") -> Callable[[str], Any]:
    """What reads a file for a model of ``in_chans`` channels: an RGB PIL image for 3 (every file
    converted, as the official code does), else a float tensor [in_chans, H, W] in [0, 1] with
    the file's own channels (``fixed_by``: see ``load_channels``). A partial, not a lambda, so that
    loader workers can pickle it."""
    return load_rgb if in_chans == 3 else functools.partial(load_channels, in_chans=in_chans, fixed_by=fixed_by)


class ClampUnit:
    """Clamp to [0, 1]: bicubic resizing overshoots at edges, which Pillow clips for 8-bit RGB;
    clipping here keeps float channels in the same range."""

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return img.clamp(0.0, 1.0)


def cover_size(img: Any, size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the smallest resize of ``img`` (aspect ratio kept) that covers ``size``."""
    width, height = TF.get_image_size(img)
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


@dataclass
class ResizeToCover:
    """Resize (bicubic) to ``cover_size``: for a non-square crop what ``Resize(int)``, which sets the
    shorter side, is for a square one; a square keeps the official ``Resize(int)``. PIL images and
    tensors alike.

    Sized before it allocates: the shorter side is scaled to the crop, so an elongated image grows
    along its long side (a 1 x 1,000,000 px line to 36 x 36,000,000 px for a 32 px crop). Its output
    is refused beyond Pillow's decompression-bomb limit (an image Pillow would not open must not be
    made by a resize either), or beyond the memory free now."""

    size: tuple[int, int]

    def __call__(self, img: Any) -> Any:
        width, height = TF.get_image_size(img)
        new_height, new_width = cover_size(img, self.size)
        pixels = new_width * new_height
        what = f"resizing its {width} x {height} px to {new_width} x {new_height} px (width x height)"
        advice = "crop it to a less elongated shape or remove it, or lower --input_size"
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and pixels > 2 * limit:  # where Pillow's warning becomes an error
            fail(f"{what} would make {pixels / 1e6:.0f} Mpx, beyond Pillow's {2 * limit / 1e6:.0f} Mpx limit; {advice}")
        # The result and the resize's intermediate (one pass per axis): 4 bytes a pixel for
        # Pillow's 8-bit RGB, 4 a value for float tensors.
        values = 1 if isinstance(img, Image.Image) else TF.get_image_num_channels(img)
        require(2 * 4 * values * pixels, what, advice)
        square = self.size[0] == self.size[1]
        new_size = [self.size[0]] if square else [new_height, new_width]
        return TF.resize(img, new_size, interpolation=BICUBIC, antialias=True)


def eval_resize(size: tuple[int, int], crop_pct: float | None = None) -> Callable:
    """The evaluation resize before a center crop of ``size`` that is ``crop_pct`` of it (``--crop_pct``);
    by default the official rule: the 256/224 ratio up to 224 px (on the longer side), none above."""
    height, width = size
    if crop_pct is None:
        crop_pct = 224 / 256 if max(height, width) <= 224 else 1.0
    cover = (int(height / crop_pct), int(width / crop_pct))
    limit = Image.MAX_IMAGE_PIXELS  # checked here, at start, rather than on the first evaluated image
    if limit is not None and cover[0] * cover[1] > 2 * limit:
        fail(
            f"--crop_pct {crop_pct} resizes every evaluation image to {cover[1]} x {cover[0]} px, beyond "
            f"Pillow's {2 * limit / 1e6:.0f} Mpx limit; raise --crop_pct"
        )
    return ResizeToCover(cover)


class OneDrawResizedCrop(transforms.RandomResizedCrop):
    """A random resized crop whose box is drawn once and clamped to the image: the official linear
    probe's crop (after BYOL's TensorFlow code). torchvision's redraws a box that does not fit, up to
    10 times, then crops the centre: on a 500 x 375 photo with scale (0.08, 1) a quarter of the first
    draws miss, and its boxes cover 43% of the image on average against 52% for this one. Where the
    first draw fits, both give the same box from the same random numbers."""

    @staticmethod
    def get_params(img: Any, scale: Sequence[float], ratio: Sequence[float]) -> tuple[int, int, int, int]:
        _, height, width = TF.get_dimensions(img)
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        log_ratio = torch.log(torch.tensor(ratio))  # float32 as torchvision draws it: the same boxes
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1])).item()
        # At least a pixel: a box under half a pixel (an image of a few pixels, a tiny --scale) rounds to
        # 0, which the official class returns too; resizing it fails on tensors (--in_chans other
        # than 3) and gives an image of no content on PIL's. Boxes of a pixel or more are unchanged.
        w = min(max(round(math.sqrt(area * aspect)), 1), width)
        h = min(max(round(math.sqrt(area / aspect)), 1), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


def tensor_train_transform(
    size: int | Sequence[int],
    scale: tuple[float, float],
    mean: Sequence[float],
    std: Sequence[float],
    rgb: bool = False,
    crop: type[transforms.RandomResizedCrop] = transforms.RandomResizedCrop,
) -> Callable:
    """Random resized crop (bicubic, antialiased) to ``size`` and flip, normalised: the official
    augmentation, on a float tensor from ``load_channels``, or with ``rgb`` on an RGB PIL image.
    ``crop``: torchvision's (pre-training, fine-tuning) or ``OneDrawResizedCrop`` (the probe)."""
    cropping = crop(size, scale=scale, interpolation=BICUBIC)  # antialiased by default
    return transforms.Compose([cropping, transforms.RandomHorizontalFlip(), *normalised(mean, std, rgb)])


def normalised(mean: Sequence[float], std: Sequence[float], rgb: bool) -> list[Callable]:
    """The tail of every transform: an RGB PIL image (``rgb``) or a float tensor in [0, 1] to a normalised tensor."""
    return [transforms.ToTensor() if rgb else ClampUnit(), transforms.Normalize(mean, std)]
