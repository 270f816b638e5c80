"""Write the labelled train/val split of the demo images, demo/cifar10-2k-split/{train,val}.txt.

    python demo/make_split.py          # rewrites the two shipped files (they are in the repository)

Every 5th image of each class (by sorted file name: 0004.jpg, 0009.jpg, ...) goes to val.txt, the
rest to train.txt: 160 + 40 images per class, disjoint, stratified, and the same on every machine.
A line is '<path> <class index>', the path relative to the list's folder and the index the class
folder's position among the sorted folder names (as ImageFolder numbers them), so that
``--data_path demo/cifar10-2k-split`` fine-tunes, probes or scores k-NN without copying an image,
and pre-training on it reads train.txt alone (the val images stay unseen).
"""

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


def main() -> None:
    os.makedirs(SPLIT, exist_ok=True)
    for split, lines in split_lines().items():
        text = "".join(f"{line}\n" for line in lines).encode()
        atomic_write(os.path.join(SPLIT, f"{split}.txt"), lambda f, text=text: f.write(text))
        print(f"{os.path.join(SPLIT, split)}.txt: {len(lines)} images")


if __name__ == "__main__":
    main()
