"""JPEG decoding on the training device (nvJPEG on a GPU): ``--loader device``.

At ImageNet resolution the CPU's JPEG decode is most of a worker's time, and a fast GPU takes
images faster than the host's cores decode them. Here the workers only read the file and draw the
crop box and flip (the draws of ``FastRandomResizedCropFlip``, in its order); moving a batch of
encoded bytes to the device decodes them in one call, then crops and resizes each with the same
antialiased bicubic kernel. Files the device decoder does not take (not JPEG, CMYK, ...) are made
in the worker by the fast loader and travel as pixels. Files the device's decoder refuses at
batch time are decoded on the CPU in the main process: counted in ``FALLBACKS`` and warned about once.
"""

import functools
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import default_collate

from util.cli.errors import fail
from util.cli.log import log
from util.data.fast_crop import (
    RATIO,
    SCALE,
    FastRandomResizedCropFlip,
    decode_jpeg,
    random_crop_box,
    read_file,
    torchvision_jpeg_size,
)
from util.data.images import decoder_reason, unreadable
from util.sizes import image_size

if decode_jpeg is not None:
    from torchvision.io import ImageReadMode


@dataclass
class EncodedCrop:
    """One image still encoded, with its crop box (top, left, height, width) and flip."""

    # The file's bytes: a bytearray crosses from worker to main process in the pickle stream, a
    # tensor each would take a shared-memory file of its own (slower: benchmarks/README.md).
    data: bytearray
    box: tuple[int, int, int, int]
    flip: bool
    size: int | tuple[int, int]  # of the output: one side (a square) or (height, width)
    path: str  # for errors


class RandomResizedCropFlipOnDevice:
    """Image file path -> ``EncodedCrop``, or the finished uint8 crop for files the device does not
    decode. Batch with ``collate_encoded``."""

    def __init__(
        self, size: int | tuple[int, int], scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO
    ):
        self.on_cpu = FastRandomResizedCropFlip(size, scale, ratio)  # also holds size, scale, ratio

    def __call__(self, path: str) -> EncodedCrop | torch.Tensor:
        data = read_file(path)
        jpeg_size = torchvision_jpeg_size(data)
        if jpeg_size is None:
            return self.on_cpu.crop(data)
        box = random_crop_box(*jpeg_size, self.on_cpu.scale, self.on_cpu.ratio)
        flip = random.random() < 0.5
        return EncodedCrop(data, box, flip, self.on_cpu.size, path)


class EncodedBatch:
    """A batch of ``EncodedCrop`` (and finished crops); ``.to(device)`` makes the uint8 images."""

    def __init__(self, items: list[EncodedCrop | torch.Tensor]):
        first = items[0]
        size = first.size if isinstance(first, EncodedCrop) else tuple(first.shape[-2:])
        self.size = image_size(size)
        # The crops made in the worker (all of the output's size) travel as one tensor: one shared-memory
        # file a batch, where a list took a file descriptor per crop and a batch of PNGs from 8 workers
        # went over the usual limit of 1024 open files ('received 0 items of ancdata'). None marks
        # their places, in order.
        made = [item for item in items if isinstance(item, torch.Tensor)]
        self.made = torch.stack(made) if made else None
        self.items = [item if isinstance(item, EncodedCrop) else None for item in items]

    def pin_memory(self) -> "EncodedBatch":
        return self  # the decoder reads the bytes from host memory; nothing to pin

    def to(self, device: torch.device | str, non_blocking: bool = False) -> torch.Tensor:
        """uint8 [N, 3, height, width] on ``device``."""
        device = torch.device(device)
        if device.type != "cuda":
            return self._make(device, non_blocking)
        # torchvision's GPU decoder writes on a stream of its own without waiting for the current
        # one, into memory allocated on the current stream: memory that kernels of the training
        # step still queued there may be about to read. On a side stream the allocator hands it
        # only blocks that side stream freed, whose work ends before this batch begins.
        side, current = _side_stream(device), torch.cuda.current_stream(device)
        side.synchronize()  # the previous batch's decode only, not the training step
        with torch.cuda.stream(side):
            images = self._make(device, non_blocking)
        current.wait_stream(side)
        images.record_stream(current)
        return images

    def _make(self, device: torch.device, non_blocking: bool) -> torch.Tensor:
        encoded = [i for i, item in enumerate(self.items) if item is not None]
        decoded = _decode([self.items[i] for i in encoded], device) if encoded else []
        out: list[torch.Tensor] = [None] * len(self.items)  # type: ignore[list-item]
        for i, pixels in zip(encoded, decoded, strict=True):
            crop = self.items[i]
            top, left, h, w = crop.box
            box = pixels[:, top : top + h, left : left + w].unsqueeze(0).float()
            # Float: the GPU has no uint8 kernel for this resize; rounded back to uint8 below.
            resized = F.interpolate(box, size=self.size, mode="bicubic", antialias=True).squeeze(0)
            out[i] = resized.flip(-1) if crop.flip else resized
        made = iter(self.made.to(device, non_blocking=non_blocking).float() if self.made is not None else ())
        for i, item in enumerate(self.items):
            if item is None:  # made and flipped in the worker
                out[i] = next(made)
        return torch.stack(out).round_().clamp_(0, 255).to(torch.uint8)


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def _decode(crops: list[EncodedCrop], device: torch.device) -> list[torch.Tensor]:
    try:
        return decode_jpeg([_as_tensor(c.data) for c in crops], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:  # the batch call does not say which file failed
        return [_decode_one(c, device) for c in crops]


def _decode_one(crop: EncodedCrop, device: torch.device) -> torch.Tensor:
    """One file on the device; on the CPU where the device's decoder refuses it (nvJPEG does not
    take every valid JPEG); an error naming the file where neither can."""
    data = _as_tensor(crop.data)
    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as e:
        refused = decoder_reason(e)
    try:
        pixels = decode_jpeg(data, mode=ImageReadMode.RGB).to(device)
    except RuntimeError as e:
        fail(unreadable(crop.path, e))
    FALLBACKS.record(crop.path, refused)
    return pixels


@dataclass
class CpuFallbacks:
    """Images the device's decoder refused and the CPU decoded instead, in the main process: a
    slow path that must not pass unseen, so it is counted and warned about (once per process)."""

    count: int = 0

    def record(self, path: str, reason: str) -> None:
        self.count += 1
        if self.count == 1:
            log.warning(
                f"the device's JPEG decoder refused {path} ({reason}); such files are decoded on the CPU in the "
                "main process, which slows training if many are (util.data.device_decode.FALLBACKS counts them)"
            )

    @property
    def warned(self) -> bool:
        return self.count > 0  # the first refusal is the one warned about

    def reset(self) -> None:
        self.count = 0


FALLBACKS = CpuFallbacks()  # this process's: the main process decodes every batch


def _as_tensor(data: bytearray) -> torch.Tensor:
    return torch.frombuffer(data, dtype=torch.uint8)


def collate_encoded(samples: list[tuple[EncodedCrop | torch.Tensor, int]]) -> tuple[EncodedBatch, torch.Tensor]:
    """The DataLoader's ``collate_fn`` for ``RandomResizedCropFlipOnDevice``."""
    return EncodedBatch([item for item, _ in samples]), default_collate([label for _, label in samples])
