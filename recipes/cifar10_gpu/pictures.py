"""The GPU study's pictures, drawn on the device from the run it leaves there: reconstructions of
one test image per class by the checkpoints of several pre-training epochs, and k-NN top-1 (on
heldout/) against epoch. The CPU study's figures.py draws both; this names the GPU run's files.

    python recipes/cifar10_gpu/pictures.py --work out/cifar10_gpu --images out/cifar10_gpu/cifar10/test \
        --epochs 0 9 49 99 199 --dest $OUT
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "cifar10_cpu"))

from figures import plot_curve, reconstruction_strip  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", required=True, type=Path, help="WORK of common.sh: pretrain/ and knn_curve.json")
    parser.add_argument("--images", required=True, type=Path, help="folder of test images for the strip")
    parser.add_argument("--epochs", nargs="+", type=int, required=True, help="kept checkpoints' epochs in the strip")
    parser.add_argument("--count", default=10, type=int, help="images in the strip")
    parser.add_argument("--dest", required=True, type=Path, help="where the two PNG files go")
    args = parser.parse_args()
    reconstruction_strip(args.work, args.images, args.epochs, args.count, args.dest / "reconstructions.png")
    plot_curve(args.work, args.dest / "knn-curve.png", "MAE pre-training on CIFAR-10 (GPU study)")
