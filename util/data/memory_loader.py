"""Pre-training data held on the training device: ``--loader memory``.

A 32-px ViT step on a fast GPU takes tens of thousands of images per second, more than worker
processes decode from files. For small data sets of equal-sized images (CIFAR-10's 50,000 are
146 MiB), the whole set is decoded once into one uint8 tensor on the device. Each batch then draws
its crop boxes and flips from ``SeededSampler``'s per-sample seeds (torchvision's RandomResizedCrop
algorithm, vectorised) and makes every crop in one batched, separable resize: Pillow's antialiased
bicubic filter written as one matrix per axis and image, so the pixels are those of the torchvision
recipe on PIL images (crop, resize, flip) up to rounding. Batches stay uint8, like the fast loader's.
"""

import itertools
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from util.cli.errors import UserError, fail
from util.data.fast_crop import RATIO, SCALE, fallback_size
from util.data.sampling import loader_generator
from util.data.splitmix import splitmix64
from util.memory import require
from util.sizes import image_size
from util.train import interrupt

ATTEMPTS = 10  # RandomResizedCrop.get_params tries this many boxes before its central fallback
DECODE_BATCH = 256  # images a decoding worker hands over at a time


def to_uint8(img: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 [3, H, W]: the transform of the data set ``decode`` reads."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def decode(
    dataset: Dataset, files: Sequence[str], device: torch.device, num_workers: int, batch_size: int, size: Sequence[int]
) -> torch.Tensor:
    """Every image of ``dataset`` (items ``(uint8 [3, H, W], label)``, in the order of ``files``)
    in one uint8 tensor [N, 3, H, W] on ``device``, sized first with the working memory of batches
    of ``batch_size`` crops of ``size`` (height, width). Images of another size than the first are
    refused: resizing them would change the crops' distribution, which is drawn from each image's
    own size (``--loader fast`` reads mixed sizes)."""
    first = dataset[0][0]
    shape = (len(dataset), *first.shape)
    _require_room(shape, _working_bytes(batch_size, first.shape, size), files[0], device)
    images = torch.empty(shape, dtype=torch.uint8, device=device)
    loader = DataLoader(
        dataset,
        batch_size=DECODE_BATCH,
        num_workers=num_workers,
        collate_fn=_stacked,
        worker_init_fn=interrupt.ignore_in_worker,
        generator=loader_generator(),
    )
    try:
        _fill(images, loader, files)
    except (UserError, KeyboardInterrupt) as stop:
        # Its traceback holds the loader's iterator and so its workers, which ignore SIGTERM
        # (interrupt.ignore_in_worker): kept until exit, they would hang the process there. Without
        # it the iterator is freed now and shuts them down.
        raise stop.with_traceback(None) from None
    return images


def _fill(images: torch.Tensor, loader: DataLoader, files: Sequence[str]) -> None:
    """``images`` from the loader's batches, each image checked to have the first one's shape."""
    start = 0
    with interrupt.starting_workers():
        batches = iter(loader)
    for batch in batches:
        # A list holds images of several sizes: one of them differs from the first image's.
        for offset, pixels in enumerate(batch if isinstance(batch, list) else batch[:1]):
            if pixels.shape != images.shape[1:]:
                _refuse_size(files[start + offset], pixels.shape, files[0], images.shape[1:])
        images[start : start + len(batch)] = batch.to(images.device)
        start += len(batch)


def _stacked(samples: list[tuple[torch.Tensor, int]]) -> torch.Tensor | list[torch.Tensor]:
    """A batch's images as one tensor, or as a list where their sizes differ (``_fill`` names the odd
    file). One tensor leaves a worker in one shared-memory file; a list of 256 held 256 file descriptors
    at once, and a few workers went over the usual limit of 1024 ('received 0 items of ancdata')."""
    pixels = [p for p, _ in samples]
    return torch.stack(pixels) if all(p.shape == pixels[0].shape for p in pixels) else pixels


def _working_bytes(batch_size: int, image_shape: Sequence[int], size: Sequence[int]) -> int:
    """What ``resized_crops`` holds at once for a batch: the images, the rows pass and the output,
    and the two resize matrices (with their temporaries: twice), in float64 at most."""
    channels, height, width = image_shape
    out_h, out_w = size
    values = channels * (height * width + height * out_w + out_h * out_w) + 2 * (out_h * height + out_w * width)
    return batch_size * values * 8 * 2


def _require_room(shape: tuple[int, ...], working: int, first_file: str, device: torch.device) -> None:
    count, channels, height, width = shape
    held = count * channels * height * width
    advice = "use --loader fast, which reads the files in worker processes"
    if working > held:  # the crops of large batches or sizes, not the images, take most: smaller ones fit
        advice = f"lower --batch_size or --input_size, or {advice}"
    require(
        held + working,
        f"--loader memory: the {count} images of --data_path ({width} x {height} px like {first_file}, uint8) "
        f"and the batches' working memory",
        advice,
        device,
    )


def _refuse_size(path: str, shape: torch.Size, first_file: str, first_shape: torch.Size) -> None:
    fail(
        f"--loader memory holds images of one size: {path} is {shape[2]} x {shape[1]} px, {first_file} "
        f"{first_shape[2]} x {first_shape[1]} px (width x height); use --loader fast, which reads mixed sizes"
    )


def draw_crops(
    seeds: np.ndarray, height: int, width: int, scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO
) -> np.ndarray:
    """(top, left, box height, box width, flip) per seed, int64 [len(seeds), 5]: the boxes of
    ``RandomResizedCrop.get_params`` for a ``height`` x ``width`` image and flips with p = 0.5, each
    row a function of its seed alone (not of the batch it is drawn in)."""
    u = _uniforms(seeds, 2 * ATTEMPTS + 3)
    log_ratio = np.log(ratio)
    target_area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:, :ATTEMPTS])
    aspect = np.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[:, ATTEMPTS : 2 * ATTEMPTS])
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # round half to even, as python's round
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    chosen = fits.argmax(axis=1)  # the first attempt that fits
    rows = np.arange(len(seeds))
    h, w, found = h[rows, chosen], w[rows, chosen], fits.any(axis=1)
    fallback_h, fallback_w = fallback_size(height, width, ratio)
    h, w = np.where(found, h, fallback_h), np.where(found, w, fallback_w)
    # randint(0, room) inclusive; the fallback box is centred.
    top = np.where(found, _below(u[:, -3], height - h + 1), (height - h) // 2)
    left = np.where(found, _below(u[:, -2], width - w + 1), (width - w) // 2)
    flip = (u[:, -1] < 0.5).astype(np.int64)
    return np.stack([top, left, h, w, flip], axis=1)


def _below(u: np.ndarray, n: np.ndarray) -> np.ndarray:
    return np.minimum((u * n).astype(np.int64), n - 1)


def _uniforms(seeds: np.ndarray, count: int) -> np.ndarray:
    """``count`` uniform floats in [0, 1) per 32-bit seed: SplitMix64 over the counter (seed, k),
    vectorised (a generator per sample would cost more than the crop itself)."""
    counter = (np.asarray(seeds, dtype=np.uint64)[:, None] << np.uint64(32)) | np.arange(count, dtype=np.uint64)
    z = splitmix64(counter, 0x632BE59BD9B4E019)
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53


def resized_crops(
    images: torch.Tensor, indices: torch.Tensor, crops: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """uint8 [B, C, height, width] of ``size``: for each index into ``images`` (uint8 [N, C, H, W]),
    its crop (``draw_crops``'s row: top, left, box height, box width, flip) resized, then flipped
    where asked, all in two batched matrix products (rows, then columns, as Pillow resamples, with
    its rounding to 8 bits in between). ``indices`` and ``crops`` on the images' device."""
    top, left, box_h, box_w, flip = crops.unbind(1)
    (batch, channels, height, width), (out_h, out_w) = (len(indices), *images.shape[1:]), size
    dtype = resample_dtype(images.device)
    rows = _resize_matrix(top, box_h, height, out_h, torch.zeros_like(flip), dtype)  # [B, out_h, H]
    cols = _resize_matrix(left, box_w, width, out_w, flip, dtype)  # [B, out_w, W]
    pixels = images.index_select(0, indices).to(dtype).view(batch, channels * height, width)
    across = torch.bmm(pixels, cols.transpose(1, 2)).round_().clamp_(0, 255)  # horizontal pass first
    across = across.view(batch, channels, height, out_w).transpose(1, 2).reshape(batch, height, channels * out_w)
    out = torch.bmm(rows, across).round_().clamp_(0, 255).to(torch.uint8)
    return out.view(batch, out_h, channels, out_w).transpose(1, 2).contiguous()


def resample_dtype(device: torch.device) -> torch.dtype:
    """float32, but float64 on GPUs: there float32 matrix products may run in TF32 (training allows
    it), whose 10-bit mantissa would move many pixels by one level."""
    return torch.float64 if device.type == "cuda" else torch.float32


def _resize_matrix(
    start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int, flip: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """[B, out_size, in_size]: row o holds the weights of the input pixels for output pixel o when
    pixels [start, start + length) are resized to ``out_size`` (Pillow's bicubic, antialiased: the
    filter widens by the reduction factor; weights normalised over the box), reversed where ``flip``."""
    device = start.device
    step = length.to(dtype) / out_size  # input pixels per output pixel
    widen = step.clamp(min=1.0)
    centers = (torch.arange(out_size, dtype=dtype, device=device) + 0.5) * step[:, None]  # in the box
    inside = torch.arange(in_size, device=device) - start[:, None]  # each image pixel's place in the box
    x = (inside[:, None, :] + 0.5 - centers[:, :, None]) / widen[:, None, None]
    weights = _bicubic(x) * ((inside >= 0) & (inside < length[:, None]))[:, None, :]
    weights = weights / weights.sum(dim=2, keepdim=True)
    return torch.where(flip.bool()[:, None, None], weights.flip(1), weights)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (Keys, a = -0.5), zero from |x| = 2 on."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


class MemoryLoader:
    """Batches ``(uint8 [batch_size, C, height, width] on the images' device, labels 0)`` as the
    pre-training DataLoader gives them: ``sampler`` (a SeededSampler: the shard, the order and each
    sample's seed; ``set_epoch(epoch, skip)``) decides which, incomplete last batches are dropped,
    ``len()`` is the iterations left in the epoch."""

    def __init__(self, images: torch.Tensor, sampler: Sampler, batch_size: int, size: int | Sequence[int]):
        self.images, self.sampler, self.batch_size = images, sampler, batch_size
        self.size = image_size(size)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        pairs = iter(self.sampler)
        for _ in range(len(self)):
            indices, seeds = zip(*itertools.islice(pairs, self.batch_size), strict=True)
            yield self.batch(np.array(indices, dtype=np.int64), np.array(seeds, dtype=np.uint32))

    def batch(self, indices: np.ndarray, seeds: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The crops of images ``indices`` drawn under ``seeds``, and their labels (0)."""
        crops = draw_crops(seeds, self.images.shape[2], self.images.shape[3])
        on_device = _to_device(np.column_stack([indices, crops]), self.images.device)  # one copy
        imgs = resized_crops(self.images, on_device[:, 0], on_device[:, 1:], self.size)
        return imgs, torch.zeros(len(indices), dtype=torch.int64)


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(values)
    if device.type != "cuda":
        return tensor.to(device)
    # From pageable memory a copy would first wait for the training step queued on the stream.
    return tensor.pin_memory().to(device, non_blocking=True)
