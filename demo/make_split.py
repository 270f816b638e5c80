"""Write the labelled train/val split of the demo images, demo/cifar10-2k-split/{train,val}.txt.

    python demo/make_split.py          # writes the two shipped files again where they differ

Every 5th image of each class (by sorted file name: 0004.jpg, 0009.jpg, ...) goes to val.txt, the
rest to train.txt: 160 + 40 images per class, disjoint, stratified, and the same on every machine.
A line is '<path> <class index>', the path relative to the list's folder and the index the class
folder's position among the sorted folder names (as ImageFolder numbers them), so that
``--data_path demo/cifar10-2k-split`` fine-tunes, probes or scores k-NN without copying an image,
and pre-training on it reads train.txt alone (the val images stay unseen).
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from util.atomic import atomic_write  # noqa: E402

DEMO = os.path.dirname(os.path.abspath(__file__))
IMAGES = os.path.join(DEMO, "cifar10-2k")
SPLIT = os.path.join(DEMO, "cifar10-2k-split")
VAL_EVERY = 5


def split_lines(images: str = IMAGES, lists: str = SPLIT, val_every: int = VAL_EVERY) -> dict[str, list[str]]:
    """The lines of train.txt and val.txt for the class folders under ``images``, paths relative to ``lists``."""
    lines: dict[str, list[str]] = {"train": [], "val": []}
    classes = sorted(c for c in os.listdir(images) if os.path.isdir(os.path.join(images, c)))
    for label, name in enumerate(classes):
        files = sorted(f for f in os.listdir(os.path.join(images, name)) if f.endswith(".jpg"))
        for position, file in enumerate(files):
            path = os.path.relpath(os.path.join(images, name, file), lists).replace(os.sep, "/")
            lines["val" if position % val_every == val_every - 1 else "train"].append(f"{path} {label}")
    return lines


def get_args_parser() -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog=f"Every {VAL_EVERY}th image of each class (by sorted file name) goes to val.txt, the rest to train.txt; "
        "a file that already holds what would be written is left untouched.",
    )


def write_unless_same(path: str, text: bytes) -> bool:
    """Write ``text`` to ``path`` unless it holds it already (returns whether it wrote): the shipped files keep
    their times, and a checkout that may not be written is not touched for nothing."""
    try:
        with open(path, "rb") as f:
            if f.read() == text:
                return False
    except FileNotFoundError:
        pass
    atomic_write(path, lambda f: f.write(text))
    return True


def main(argv: list[str] | None = None, images: str = IMAGES, lists: str = SPLIT) -> None:
    get_args_parser().parse_args(argv)  # no flags: --help says what it writes, before anything is
    os.makedirs(lists, exist_ok=True)
    for split, lines in split_lines(images, lists).items():
        path = os.path.join(lists, f"{split}.txt")
        wrote = write_unless_same(path, "".join(f"{line}\n" for line in lines).encode())
        print(f"{path}: {len(lines)} images{'' if wrote else ' (unchanged)'}")


if __name__ == "__main__":
    main()
