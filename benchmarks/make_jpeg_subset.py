"""A JPEG subset small enough to travel with a device run (gpu_check.sh's loader and end-to-end parts).

    python -m benchmarks.make_jpeg_subset [--source ../shared/datasets/imagenet-1k-samples]
    python benchmarks/make_jpeg_subset.py ...   # the same

Copies whole class folders' files, in sorted order, until ``--max_mib`` is reached, into
``--dest``/images/<class>/ (an ImageFolder, as the official pipeline reads it), and writes
``--dest``/train.txt, a list file naming them over and over up to ``--images`` lines: one epoch is
then long enough that the loaders' workers never drain during a measurement.
"""

import argparse
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository's util

from util.atomic import atomic_write  # noqa: E402
from util.cli.errors import fail, run_cli  # noqa: E402
from util.data.datasets import IMG_EXTENSIONS  # noqa: E402


def pick_files(source: Path, max_bytes: int) -> list[Path]:
    """Image files of ``source`` in sorted order while their total stays within ``max_bytes``."""
    picked, total = [], 0
    for path in sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS):
        size = path.stat().st_size
        if total + size > max_bytes:
            break
        picked.append(path)
        total += size
    return picked


def make_subset(source: Path, dest: Path, max_bytes: int, images: int) -> list[Path]:
    """Copy the files and write the repeating list; returns the copies."""
    files = pick_files(source, max_bytes)
    if not files:
        fail(f"--source {source} holds no images within --max_mib; give the folder of ImageNet samples")
    shutil.rmtree(dest / "images", ignore_errors=True)
    copies = []
    for path in files:
        copy = dest / "images" / path.relative_to(source)
        if len(copy.relative_to(dest / "images").parts) < 2:  # ImageFolder needs a class folder
            copy = dest / "images" / "all" / path.name
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, copy)
        copies.append(copy)
    lines = [str(copies[i % len(copies)].relative_to(dest)) for i in range(max(images, len(copies)))]
    atomic_write(str(dest / "train.txt"), lambda f: f.write(("\n".join(lines) + "\n").encode()))
    return copies


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser("JPEG subset for gpu_check.sh", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", default=str(REPO.parent / "shared" / "datasets" / "imagenet-1k-samples"))
    p.add_argument("--dest", default=str(REPO / "benchmarks" / "jpeg_subset"))
    p.add_argument("--max_mib", default=36.0, type=float, help="total size of the copied files")
    # 34 batches of 256: gpu_check's loader part times 32 after 2 untimed ones, all in the list's first epoch.
    p.add_argument("--images", default=8704, type=int, help="lines of the list file (the files repeated)")
    args = p.parse_args(argv)
    if not Path(args.source).is_dir():
        fail(f"--source {args.source} is not a folder; give the folder of ImageNet samples")
    copies = make_subset(Path(args.source), Path(args.dest), int(args.max_mib * 2**20), args.images)
    size = sum(c.stat().st_size for c in copies) / 2**20
    print(f"{len(copies)} images ({size:.1f} MiB) in {args.dest}/images, listed {args.images} times in train.txt")


if __name__ == "__main__":
    run_cli(main)
