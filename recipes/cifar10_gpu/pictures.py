"""The GPU study's pictures, drawn on the device from the run it leaves there: reconstructions of
one test image per class by the checkpoints of several pre-training epochs, and k-NN top-1 (on
heldout/) against epoch. The CPU study's figures.py draws both; this names the GPU run's files.

    python recipes/cifar10_gpu/pictures.py --work out/cifar10_gpu --images out/cifar10_gpu/cifar10/test \
        --epochs 0 10 50 100 199 --dest $OUT
"""

import argparse
import re
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cifar10_cpu"))

from figures import plot_curve, reconstruction_strip  # noqa: E402


def strip_epochs(run: Path, asked: list[int]) -> list[int]:
    """The asked epochs whose checkpoint the run kept, then its newest epoch checkpoint if that is
    later: a shorter run, or one stopped at its time limit, still gets a strip of what it has."""
    kept = {int(m[1]) for p in run.glob("checkpoint-*.pth") if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", p.name))}
    epochs = [e for e in asked if e in kept]
    newest = max(kept, default=None)
    if newest is not None and newest > max(epochs, default=-1):
        epochs.append(newest)
    if epochs != asked:
        print(f"the strip shows epochs {epochs}: {run} has no checkpoint of the others asked", file=sys.stderr)
    return epochs


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="WORK of common.sh: pretrain/ and knn_curve.json")
    parser.add_argument("--images", required=True, type=Path, help="folder of test images for the strip")
    parser.add_argument("--epochs", nargs="+", type=int, required=True, help="kept checkpoints' epochs in the strip")
    parser.add_argument("--count", default=10, type=int, help="images in the strip")
    parser.add_argument("--dest", required=True, type=Path, help="where the two PNG files go")
    args = parser.parse_args()
    drawings = {  # each drawn whatever happens to the other: both are a device call's only pictures
        "knn-curve.png": lambda path: plot_curve(args.work, path, "MAE pre-training on CIFAR-10 (GPU study)"),
        "reconstructions.png": lambda path: reconstruction_strip(
            args.work, args.images, strip_epochs(args.work / "pretrain", args.epochs), args.count, path
        ),
    }
    failed = False
    for name, draw in drawings.items():
        try:
            draw(args.dest / name)
        except Exception:
            traceback.print_exc()
            failed = True
    sys.exit(1 if failed else 0)
