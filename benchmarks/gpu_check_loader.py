"""gpu_check.sh part 4: the three pre-training loaders alone (decode, random resized crop, flip;
batches moved to the device, where ``device`` decodes them), on the JPEG subset that
make_jpeg_subset.py lists over and over, so that the workers never drain within a measurement."""

import math
from argparse import Namespace

import torch

from benchmarks.bench_pretrain import bench_loader
from benchmarks.gpu_check_common import PartRecord, Sizes, data_path, run_part
from util.data.datasets import pretrain_dataset
from util.data.device_decode import FALLBACKS

WARMUP = 2  # untimed batches: the workers' start


def first_epoch_images(path: str, batch: int, wanted: int) -> int:
    """At most ``wanted`` images, in whole batches that the first epoch of ``path`` still holds after the
    warm-up batches. At an epoch's end the workers drain: the loader asks for the next epoch's batches only
    once the last one is taken, and their refill, a batch's time for every worker, was timed as the loader's.
    A list of 8,192 lines is 32 batches of 256, and 2 warm-up and 32 timed batches crossed into the second
    epoch: with 15 workers holding 2 batches each, the refill was a third of the time measured (simulated with
    15 workers whose images each cost 2 ms of waiting: 5,050 img/s of the 7,500 they make, and 7,140 to 7,340
    with the timed batches inside the epoch). make_jpeg_subset.py lists 8,704 lines: 34 batches, all of them
    in the first epoch."""
    per_epoch = len(pretrain_dataset(path, None)) // batch  # the loaders drop an epoch's last partial batch
    timed = min(math.ceil(wanted / batch), per_epoch - WARMUP)
    if timed < 1:
        raise ValueError(f"{path} holds {per_epoch} batches of {batch}: too few for {WARMUP} untimed and 1 timed")
    return timed * batch


def loader_args(sizes: Sizes, device: torch.device, batch: int) -> Namespace:
    path = data_path(sizes)
    return Namespace(
        data_path=path, input_size=sizes.loader_size, batch_size=batch, device=str(device),
        loader_images=first_epoch_images(path, batch, sizes.loader_images), warmup=WARMUP, seed=0,
    )  # fmt: skip


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    args = loader_args(sizes, device, min(sizes.batch, 256))
    for loader in ("fast", "device", "torchvision"):

        def measure(loader: str = loader) -> None:
            FALLBACKS.reset()
            result = bench_loader(args, loader, sizes.workers)
            row = {"loader": loader, "workers": sizes.workers, "input_size": args.input_size, "batch": args.batch_size}
            row["img_s"] = result["images_per_s"]
            if loader == "device":
                row["cpu_fallbacks"] = FALLBACKS.count  # images the GPU's decoder refused
            record.row("loader", row)

        record.attempt(f"loader {loader}", measure)


if __name__ == "__main__":
    run_part("loader", main)
