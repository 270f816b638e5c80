"""gpu_check.sh part 4: the three pre-training loaders alone (decode, random resized crop, flip;
batches moved to the device, where ``device`` decodes them), on the JPEG subset that
make_jpeg_subset.py lists over and over, so that the workers never drain within a measurement."""

from argparse import Namespace

import torch

from benchmarks.bench_pretrain import bench_loader
from benchmarks.gpu_check_common import PartRecord, Sizes, data_path, run_part
from util.data.device_decode import FALLBACKS


def loader_args(sizes: Sizes, device: torch.device, batch: int) -> Namespace:
    return Namespace(
        data_path=data_path(sizes), input_size=sizes.loader_size, batch_size=batch, device=str(device),
        loader_images=sizes.loader_images, warmup=2, seed=0,
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
