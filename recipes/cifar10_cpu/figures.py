"""The CPU study's pictures: k-NN top-1 and loss against pre-training epoch, and reconstructions
of the same test images by the checkpoints of several epochs.

    python recipes/cifar10_cpu/figures.py --out out/cifar10_cpu --images ../shared/datasets/cifar10/test \
        --epochs 0 4 9 19 29 --docs docs

matplotlib is needed for the curve only (``pip install matplotlib``).
"""

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models_mae  # noqa: E402
from util.atomic import atomic_write  # noqa: E402
from util.checkpoint.load import load_checkpoint, model_state  # noqa: E402
from util.data.datasets import image_walk  # noqa: E402
from util.data.loaders import eval_transform  # noqa: E402
from util.data.normalization import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from util.eval.pictures import fixed_noise, load_images, reconstruction_grid, save_png  # noqa: E402


def knn_by_epoch(out: Path) -> dict[int, dict]:
    """Scores by epoch, from the pre-training log (a run with --knn_data_path) or, failing that,
    from knn_curve.json (knn_curve.sh over the kept checkpoints)."""
    scores = {}
    log = out / "pretrain" / "log.txt"
    for line in log.read_text().splitlines() if log.exists() else []:
        entry = json.loads(line)
        if "knn_cls_top1" in entry:
            scores[entry["epoch"]] = {k[4:]: v for k, v in entry.items() if k.startswith("knn_")}
    curve = out / "knn_curve.json"
    for line in curve.read_text().splitlines() if curve.exists() and not scores else []:
        entry = json.loads(line)
        found = re.search(r"checkpoint-(\d+)\.pth$", entry["encoder"])
        if found:
            scores[int(found.group(1))] = entry
    return dict(sorted(scores.items()))


def plot_curve(out: Path, path: Path, title: str = "MAE pre-training on CIFAR-10 (2-core CPU)") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = [json.loads(line) for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    knn = knn_by_epoch(out)
    fig, left = plt.subplots(figsize=(6.4, 3.6), dpi=120)
    left.plot([e for e in knn], [s["cls_top1"] for s in knn.values()], "o-", label="k-NN top-1, class token")
    left.plot([e for e in knn], [s["avg_top1"] for s in knn.values()], "s-", label="k-NN top-1, mean patch token")
    random = _random_score(out)
    if random is not None:
        left.axhline(random, color="gray", linestyle=":", label="random-init encoder (class token)")
    left.set_xlabel("pre-training epoch")
    left.set_ylabel("k-NN top-1 (%)")
    right = left.twinx()
    right.plot([x["epoch"] for x in losses], [x["train_loss"] for x in losses], color="black", alpha=0.4)
    right.set_ylabel("training loss (grey)")
    left.legend(loc="lower right", fontsize=8)
    left.set_title(title, fontsize=10)
    fig.tight_layout()
    atomic_write(str(path), lambda f: fig.savefig(f, format="png"))  # a crash leaves no torn picture
    print(f"wrote {path}")


def _random_score(out: Path) -> float | None:
    curve = out / "knn_curve.json"
    for line in curve.read_text().splitlines() if curve.exists() else []:
        entry = json.loads(line)
        if entry["encoder"] == "random":
            return entry["cls_top1"]
    return None


@torch.no_grad()
def reconstruction_strip(out: Path, images: Path, epochs: list[int], count: int, path: Path) -> None:
    """Rows: the originals, the masked inputs, then each epoch's reconstruction (with the visible
    patches pasted back); one column per image, the same mask throughout."""
    # The images as training finds them: no hidden files (macOS's '._*.jpg'), no links out of the folder.
    files = sorted(Path(folder, n) for folder, names in image_walk(str(images), str(images)) for n in names)
    files = files[:: max(len(files) // count, 1)][:count]  # evenly spaced: one per class for CIFAR
    rows = []
    for epoch in epochs:
        ckpt_path = out / "pretrain" / f"checkpoint-{epoch}.pth"
        ckpt = load_checkpoint(str(ckpt_path))
        saved = vars(ckpt["args"])
        model = models_mae.create_model(saved["model"], saved["input_size"], norm_pix_loss=saved["norm_pix_loss"])
        model.load_state_dict(model_state(ckpt, str(ckpt_path)))
        norm = saved.get("mean", IMAGENET_MEAN), saved.get("std", IMAGENET_STD)  # the run's --mean/--std
        imgs = load_images([str(f) for f in files], eval_transform(saved["input_size"], *norm))
        noise = fixed_noise(len(files), model.num_patches)
        grid = reconstruction_grid(model, imgs, noise, saved["mask_ratio"], *norm)
        h, w = grid.shape[0] // len(files), grid.shape[1] // 4
        panels = [grid[i * h : (i + 1) * h] for i in range(len(files))]  # one image's 4 panels each
        if not rows:
            rows += [
                np.concatenate([p[:, :w] for p in panels], 1),
                np.concatenate([p[:, w : 2 * w] for p in panels], 1),
            ]
        rows.append(np.concatenate([p[:, 3 * w :] for p in panels], 1))
    save_png(np.concatenate(rows, 0), str(path))
    print(f"wrote {path}: rows original, masked, then epochs {', '.join(map(str, epochs))}")


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="the study's output folder (OUT of common.sh)")
    parser.add_argument("--images", required=True, type=Path, help="folder of test images for the strip")
    parser.add_argument("--epochs", nargs="+", type=int, required=True, help="checkpoints' epochs in the strip")
    parser.add_argument("--count", default=10, type=int, help="images in the strip")
    parser.add_argument("--docs", default=Path("docs"), type=Path, help="where the pictures go")
    return parser


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    args.docs.mkdir(parents=True, exist_ok=True)
    reconstruction_strip(
        args.out, args.images, args.epochs, args.count, args.docs / "cifar10-cpu-study-reconstructions.png"
    )
    plot_curve(args.out, args.docs / "cifar10-cpu-study-knn.png")
