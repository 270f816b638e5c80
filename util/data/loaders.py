"""The transforms and loaders over the data sets of datasets.py: pre-training's augmentation (``--loader``),
evaluation's resize and crop, and the seeded, sharded training and evaluation loaders, sized before they are made."""

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from util.cli.errors import UserError, fail
from util.cli.log import log
from util.data import memory_loader
from util.data.channels import eval_resize, image_loader, normalised, tensor_train_transform
from util.data.datasets import ImageFiles, pretrain_dataset
from util.data.device_decode import RandomResizedCropFlipOnDevice, collate_encoded
from util.data.fast_crop import FastRandomResizedCropFlip
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD, check_norm
from util.data.sampling import SeededDataset, SeededSampler, ShardSampler, loader_generator, require_a_share_each
from util.memory import require, require_shared_memory
from util.sizes import image_size, shown_size
from util.train import distributed, interrupt

# Transforms
PRETRAIN_LOADERS = ("fast", "device", "torchvision", "memory")


def pretrain_transform(
    input_size: int | Sequence[int],
    loader: str = "torchvision",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    in_chans: int = 3,
) -> Callable:
    """The official pre-training augmentation: random resized crop (scale 0.2-1, bicubic) and flip.

    ``loader`` (``--loader``): ``torchvision``, the recipe, normalised with ``mean``/``std``; ``fast``,
    its distribution from ``FastRandomResizedCropFlip`` (uint8, normalised on the device), ``device``
    that with the JPEG decode on the device (device_decode.py); both need a ``lazy`` dataset. With
    ``in_chans`` other than 3 the recipe runs on float tensors from ``load_channels``, whatever ``loader``
    says (``pretrain_data`` says so, or refuses ``device``). ``input_size``: one side or (height, width).
    """
    size = image_size(input_size)
    if in_chans != 3:
        check_norm(mean, std, in_chans)
    elif loader == "fast":
        return FastRandomResizedCropFlip(size)
    elif loader == "device":
        return RandomResizedCropFlipOnDevice(size)
    return tensor_train_transform(size, (0.2, 1.0), mean, std, rgb=in_chans == 3)


def pretrain_data(args: Any, fixed_by: str = "") -> tuple[ImageFiles, DataLoader | memory_loader.MemoryLoader]:
    """Dataset and training loader for pre-training: ``--data_path``, ``--input_size``, ``--loader``;
    ``fixed_by``: the checkpoint whose weights set ``--in_chans`` (``util.data.images.load_channels``)."""
    in_chans = getattr(args, "in_chans", 3)
    loader = args.loader
    if in_chans != 3 and loader in ("device", "memory"):
        holds = "decodes 8-bit RGB JPEGs on" if loader == "device" else "holds 8-bit RGB images on"
        fail(
            f"--loader {loader} {holds} the device; with --in_chans {in_chans} use --loader fast "
            f"or torchvision (both then read the files' own channels on the CPU)"
        )
    if loader == "memory":
        return memory_pretrain_data(args)
    if in_chans != 3 and loader == "fast":
        # Its shortcuts (JPEG draft decoding, uint8 batches) are for 8-bit RGB; the files' own
        # channels, 16-bit ones included, go through the tensor version of the same recipe.
        log.info(f"--loader fast with --in_chans {in_chans}: images are read and cropped as --loader torchvision does")
        loader = "torchvision"
    transform = pretrain_transform(args.input_size, loader, args.mean, args.std, in_chans)
    dataset = pretrain_dataset(
        args.data_path, transform, lazy=loader != "torchvision", loader=image_loader(in_chans, fixed_by)
    )
    value_bytes = 4 if loader == "torchvision" else 1  # fast and device batches stay uint8 until the device
    return dataset, train_loader(dataset, args, collate_encoded if loader == "device" else None, value_bytes)


def memory_pretrain_data(args: Any) -> tuple[ImageFiles, memory_loader.MemoryLoader]:
    """``--loader memory``: the data set decoded once onto ``--device``, cropped there per batch."""
    dataset = pretrain_dataset(args.data_path, memory_loader.to_uint8)
    check_enough_images(len(dataset), args)
    device, size = torch.device(args.device), image_size(args.input_size)
    images = memory_loader.decode(dataset, dataset.files, device, args.num_workers, args.batch_size, size)
    sampler = SeededSampler(len(dataset), args.seed)
    return dataset, memory_loader.MemoryLoader(images, sampler, args.batch_size, args.input_size)


def eval_transform(
    input_size: int | Sequence[int],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    in_chans: int = 3,
    crop_pct: float | None = None,
) -> Callable:
    """Resize by the 256/224 ratio (bicubic; above 224 px to the crop's size, as officially) or so that
    the crop is ``crop_pct`` of the image, center crop, normalise.
    ``input_size``: one side or (height, width); with ``in_chans`` other than 3 the images are float
    tensors from ``load_channels``."""
    size = image_size(input_size)
    if in_chans != 3:
        check_norm(mean, std, in_chans)
    resize = eval_resize(size, crop_pct)
    return transforms.Compose([resize, transforms.CenterCrop(size), *normalised(mean, std, in_chans == 3)])


def require_batch_memory(
    input_size: int | Sequence[int], in_chans: int, batch_size: int, num_workers: int, value_bytes: int = 4
) -> None:
    """Refuse, before a loader is made, batches that cannot fit in CPU memory: the batch in use and the
    ``prefetch_factor`` (2) batches each worker prepares ahead; and the room those take in /dev/shm."""
    height, width = image_size(input_size)
    in_flight = 1 + 2 * num_workers
    batch_bytes = batch_size * in_chans * height * width * value_bytes
    advice = "lower --batch_size, --input_size or --num_workers"
    require(
        in_flight * batch_bytes,
        f"{batch_size} x {in_chans} x {height} x {width} images a batch, {in_flight} batch(es) held at once "
        f"(--input_size {shown_size(input_size)})",
        advice,
    )
    require_shared_memory(batch_bytes, num_workers, advice)


def check_enough_images(count: int, args: Any) -> None:
    """Refuse a data set smaller than one batch on every process: an epoch would have no iteration."""
    if count < args.batch_size * distributed.world_size():
        fail(
            f"--batch_size {args.batch_size} x {distributed.world_size()} process(es) is more than the "
            f"{count} images in --data_path; lower --batch_size"
        )


def train_loader(dataset: Dataset, args: Any, collate_fn: Callable | None = None, value_bytes: int = 4) -> DataLoader:
    """Shuffled, sharded, seeded loader; drops the last incomplete batch. ``value_bytes``: the size
    of a pixel value in its batches (float32: 4), for sizing them first."""
    check_enough_images(len(dataset), args)
    require_batch_memory(args.input_size, getattr(args, "in_chans", 3), args.batch_size, args.num_workers, value_bytes)
    return DataLoader(
        SeededDataset(dataset),
        sampler=SeededSampler(len(dataset), args.seed),
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        drop_last=True,
        persistent_workers=args.num_workers > 0,
        collate_fn=collate_fn,
        worker_init_fn=interrupt.ignore_in_worker,
        generator=loader_generator(args.seed),
    )


def eval_loader(dataset: Dataset, args: Any) -> DataLoader:
    require_batch_memory(args.input_size, getattr(args, "in_chans", 3), args.batch_size, args.num_workers)
    if args.dist_eval:  # the probe's BatchNorm statistics go out in the first forward pass: every rank makes it
        subject = f"--dist_eval: the {len(dataset)} validation image(s) of --data_path {args.data_path}"
        require_a_share_each(len(dataset), subject, "drop --dist_eval (each process then scores them all)")
    sampler: Sequence[int] = ShardSampler(len(dataset)) if args.dist_eval else range(len(dataset))
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and str(args.device).startswith("cuda"),
        drop_last=False,
        worker_init_fn=interrupt.ignore_in_worker,
        generator=loader_generator(),
    )


def batches(loader: Iterable) -> Iterator:
    """``loader``'s batches. A loader worker's one-line error (a corrupt image) is raised again without its
    traceback: torch raises it from a frame that holds it, a reference cycle that keeps the loader's iterator
    for the garbage collector, which closed the iterator's queues before asking its workers to stop, then
    waited up to 10 s for each (a rank with --num_workers 10 took 46 s to exit, its peers waiting for it). Without
    the traceback the iterator goes when the error has been reported, and its workers stop at once."""
    with interrupt.starting_workers():
        iterator = iter(loader)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except UserError as e:
            raise e.with_traceback(None) from None
        yield batch
