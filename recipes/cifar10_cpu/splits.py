"""The CPU study's data splits, as folders of links to the CIFAR-10 JPEGs (nothing is copied).

    python recipes/cifar10_cpu/splits.py --data ../shared/datasets/cifar10 --out out/cifar10_cpu/data

Every split is an ImageFolder with ``train/`` and ``val/`` (or ``test/``) and the ten classes:

* ``heldout``: train = the 45,000 training images left after taking every 10th image of each
  class (sorted by name) into val = 5,000 images; for choosing hyper-parameters, never the test set.
* ``labels10-val``: train = 10% of ``heldout/train``'s labels (the first ``--per_class`` 500
  images of each class of it), val = ``heldout/val``.
* ``labels10-test``: the same 5,000 labelled images, test = the 10,000 CIFAR-10 test images.

Pre-training uses all 50,000 training images without labels (``--data``'s ``train/``), and the
full-label rows use ``--data`` itself.
"""

import argparse
import os
from pathlib import Path


def class_files(folder: Path) -> dict[str, list[Path]]:
    if not folder.is_dir():  # else iterdir's FileNotFoundError, a traceback
        raise SystemExit(f"error: {folder} is not a folder; give --data the CIFAR-10 ImageFolder root")
    # Hidden names are no data, as training reads it (util.data.datasets.is_hidden): a '.ipynb_checkpoints'
    # folder is no class, macOS's '._<name>.jpg' files no images to take val's every 10th place.
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SystemExit(f"error: {folder} has no class folders; give --data the CIFAR-10 ImageFolder root")
    return {c: sorted(p for p in (folder / c).iterdir() if p.is_file() and not p.name.startswith(".")) for c in classes}


def link_all(files: dict[str, list[Path]], dest: Path) -> None:
    """``dest/<class>/<name>`` -> the file, for every file; an existing split is left as it is."""
    for cls, paths in files.items():
        (dest / cls).mkdir(parents=True, exist_ok=True)
        for path in paths:
            link = dest / cls / path.name
            if not link.exists():
                os.symlink(path.resolve(), link)


def make_splits(data: Path, out: Path, per_class: int = 500, val_every: int = 10) -> dict[str, int]:
    """Build the splits under ``out``; returns the number of images of each split's folders."""
    train = class_files(data / "train")
    test = class_files(data / "test")
    val = {c: paths[::val_every] for c, paths in train.items()}
    rest = {c: [p for i, p in enumerate(paths) if i % val_every] for c, paths in train.items()}
    few = {c: paths[:per_class] for c, paths in rest.items()}
    short = min(few, key=lambda c: len(few[c]))  # the class with fewest images
    if len(few[short]) < per_class:
        raise SystemExit(
            f"error: {data}/train/{short} has {len(few[short])} training images outside val, fewer than --per_class "
            f"{per_class}; lower --per_class"
        )
    layout = {
        "heldout/train": rest,
        "heldout/val": val,
        "labels10-val/train": few,
        "labels10-val/val": val,
        "labels10-test/train": few,
        "labels10-test/test": test,
    }
    for name, files in layout.items():
        link_all(files, out / name)
    return {name: sum(len(p) for p in files.values()) for name, files in layout.items()}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path, help="CIFAR-10 ImageFolder root with train/ and test/")
    parser.add_argument("--out", required=True, type=Path, help="where the split folders go")
    parser.add_argument("--per_class", default=500, type=int, help="labelled images per class of the few-label split")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    for split, count in make_splits(args.data, args.out, args.per_class).items():
        print(f"{args.out / split}: {count} images")
