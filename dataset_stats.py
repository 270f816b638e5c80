"""Per-channel mean and standard deviation of a data set's pixels: the values of --mean and --std.

    python dataset_stats.py --data_path /path/to/images --input_size 224
    python dataset_stats.py --data_path /path/to/train.txt --max_images 20000 --json stats.json

``--data_path`` is read as main_pretrain.py reads it (a folder of images, its ``train/`` or
``train.txt``, or a list file). Each image is read as RGB, resized as a whole to ``input_size``²
with Pillow's bicubic resize (the one the training crops go through, antialiased when it shrinks),
its 8-bit pixels scaled to [0, 1]; mean and population standard deviation are taken per channel
over every pixel. Resizing first gives every image the same weight, as training does (one crop
per image and epoch); ``--input_size 0`` takes each image at its own size. The sums are exact
integers, so the result depends neither on the order of the images nor on ``--num_workers``.

With ``--in_chans`` other than 3, images are read as training reads them (their own channels,
each value over its bit depth's largest) and resized as its tensor crops are (torch's bicubic,
antialiased, clamped to [0, 1]); the sums are then float64, added in the images' order (the same
for any ``--num_workers``).
"""

import argparse
import json
import math
import sys
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as TF

from util.atomic import atomic_write, reported
from util.cli.args import add_in_chans_arg, check_at_least, default_workers
from util.cli.errors import run_cli
from util.data.channels import BICUBIC, image_loader
from util.data.datasets import pretrain_dataset
from util.data.normalization import show_values
from util.data.sampling import evenly_spaced
from util.memory import require
from util.outputs import check_json_output


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Per-channel pixel mean and std of a data set, for --mean and --std")
    parser.add_argument("--data_path", required=True, help="folder of images or list file, as main_pretrain.py's")
    parser.add_argument("--input_size", default=224, type=int, help="resize each image to this square size (0: don't)")
    parser.add_argument("--max_images", default=0, type=int, metavar="N", help="use N evenly spaced images (0: all)")
    # Never more than the usable cores, where PyTorch warns (twice per loader) that workers may slow down or freeze.
    parser.add_argument(
        "--num_workers", default=default_workers(4), type=int, help="data-loading processes (default: min(4, cores))"
    )
    add_in_chans_arg(parser, default="3")  # None: 3, RGB
    parser.add_argument("--json", default="", metavar="FILE", help="also write the JSON result to FILE ('-': stdout)")
    return parser


# Bytes a pixel of an RGB image costs here: Pillow's image (4) and its resize's intermediate (4),
# the array of it (3) and the 64-bit copy of one channel that np.bincount counts (8).
BYTES_PER_PIXEL = 19


class PixelSums:
    """Image -> int64 [3, C]: per channel, the pixel count, the sum of the 8-bit values and the sum
    of their squares (exact up to 10^14 images of 224²), from a histogram of the 256 values, not a
    64-bit copy of every pixel. With ``processes`` images summed at once, the resize to
    ``input_size``² is sized here, before any image is read; each image at its own size
    (``input_size`` 0) is sized before it is made an array."""

    def __init__(self, input_size: int, processes: int = 1, pixel_bytes: int = BYTES_PER_PIXEL):
        self.input_size, self.processes, self.pixel_bytes = input_size, processes, pixel_bytes
        if input_size:
            require(
                self.pixel_bytes * input_size * input_size * processes,
                f"resizing an image to --input_size {input_size} ({input_size} x {input_size} px) in {processes} "
                f"process(es)",
                "lower --input_size or --num_workers",
            )

    def require_own_size(self, width: int, height: int) -> None:
        """Size an image read at its own size (``input_size`` 0) before it is made an array."""
        require(
            self.pixel_bytes * width * height * self.processes,
            f"reading images of {width} x {height} px at their own size (--input_size 0) in "
            f"{self.processes} process(es)",
            "give --input_size (224, say) or lower --num_workers",
        )

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.input_size:
            img = img.resize((self.input_size, self.input_size), Image.BICUBIC)
        else:
            self.require_own_size(*img.size)
        pixels = np.asarray(img).reshape(-1, len(img.getbands()))
        values = np.arange(256, dtype=np.int64)
        counts = np.stack([np.bincount(pixels[:, c], minlength=256) for c in range(pixels.shape[1])])
        count = np.full(pixels.shape[1], pixels.shape[0], dtype=np.int64)
        return torch.from_numpy(np.stack([count, counts @ values, counts @ (values * values)]))


class ChannelSums(PixelSums):
    """Float tensor [C, H, W] in [0, 1] (``util.data.images.load_channels``) -> float64 [3, C]:
    per channel, the value count, sum and sum of squares, after the resize training's tensor crops
    use. Sized as ``PixelSums`` is, at 4 bytes a value for the image and the resize, 8 for the sums."""

    def __init__(self, input_size: int, in_chans: int, processes: int = 1):
        super().__init__(input_size, processes, pixel_bytes=(2 * 4 + 8) * in_chans)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        channels, height, width = img.shape
        if self.input_size:
            size = [self.input_size, self.input_size]
            img = TF.resize(img, size, interpolation=BICUBIC, antialias=True).clamp(0.0, 1.0)
        else:
            self.require_own_size(width, height)
        values = img.reshape(channels, -1).double()
        count = torch.full((channels,), values.shape[1], dtype=torch.float64)
        return torch.stack([count, values.sum(dim=1), (values * values).sum(dim=1)])


def mean_std(sums: torch.Tensor) -> tuple[list[float], list[float]]:
    """Mean and population std of the values from ``PixelSums`` totals (pixels / 255, computed in
    exact fractions and rounded once; only the square root rounds again) or ``ChannelSums`` ones
    (float64)."""
    means, stds = [], []
    for n, s, q in sums.T.tolist():
        if sums.dtype == torch.int64:
            means.append(float(Fraction(s, 255 * n)))
            stds.append(math.sqrt(Fraction(q * n - s * s, (255 * n) ** 2)))
        else:
            means.append(s / n)
            stds.append(math.sqrt(max(q / n - (s / n) ** 2, 0.0)))  # (rounding may leave -1e-17)
    return means, stds


def check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, and --json's, before any image is read."""
    check_at_least(args, 0, "input_size", zero_means="each image at its own size")
    check_at_least(args, 0, "max_images", zero_means="all")
    check_at_least(args, 0, "num_workers")
    if args.json not in ("", "-"):
        # Before the work, not after it. A list file is an input; an image or a folder's train.txt
        # is not JSON, which is all that --json replaces.
        check_json_output(args.json, "--json", inputs=[("--data_path", args.data_path)])
    if args.in_chans is not None:
        check_at_least(args, 1, "in_chans")


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The statistics of ``args.data_path``, as the JSON record ``main`` writes."""
    check_args(args)
    in_chans = args.in_chans or 3
    processes = max(args.num_workers, 1)
    if in_chans == 3:
        dataset = pretrain_dataset(args.data_path, PixelSums(args.input_size, processes))
    else:
        sums = ChannelSums(args.input_size, in_chans, processes)
        dataset = pretrain_dataset(args.data_path, sums, loader=image_loader(in_chans))
    if 0 < args.max_images < len(dataset):
        dataset.files = [dataset.files[i] for i in evenly_spaced(args.max_images, len(dataset))]
    mean, std = mean_std(add_up(DataLoader(dataset, batch_size=64, num_workers=args.num_workers), len(dataset)))
    return dict(
        mean=mean, std=std, images=len(dataset), input_size=args.input_size, in_chans=in_chans, data_path=args.data_path
    )


def add_up(loader: DataLoader, images: int) -> torch.Tensor:
    """The per-image sums of ``loader``'s ``images`` added up, with a progress line on stderr at every tenth
    of a long computation (20 batches or more)."""
    report_every = max(images // 10, 1) if len(loader) >= 20 else images + 1
    total, done = 0, 0
    for sums, _ in loader:
        total = total + sums.sum(dim=0)
        before, done = done, done + len(sums)
        if before // report_every != done // report_every and done < images:
            print(f"{done}/{images} images", file=sys.stderr)
    return total


def flags(stats: dict[str, Any]) -> str:
    """The flags to paste into main_pretrain.py and the others."""
    return f"--mean {show_values(stats['mean'])} --std {show_values(stats['std'])}"


def main(args: argparse.Namespace) -> None:
    stats = compute(args)
    size = f"resized to {args.input_size} x {args.input_size} (bicubic)" if args.input_size else "at their own sizes"
    channels = "" if stats["in_chans"] == 3 else f", {stats['in_chans']} channel(s) (give --in_chans too)"
    if args.json and args.json != "-":  # before the lines: a reader of stdout that ends early (| head) loses no file
        text = json.dumps(stats, indent=1) + "\n"
        with reported(args.json, "--json"):
            atomic_write(args.json, lambda f: f.write(text.encode("utf-8")))
    print(f"{stats['images']} images of {args.data_path}, {size}, pixels scaled to [0, 1]{channels}:")
    print(flags(stats))
    if args.json == "-":
        print(json.dumps(stats))


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
