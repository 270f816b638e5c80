"""The GPU study's budget: training FLOPs per image, and minutes per device command at a stated
model FLOP utilisation (README.md's table is this script's output).

    python recipes/cifar10_gpu/plan.py --mfu 0.15
    python recipes/cifar10_gpu/plan.py --mfu 0.12 --peak_tflops 798   # as gpu_check.md's study lines give it

FLOPs count a multiply-add as 2; a training step is 3 forward passes (backward: twice the forward).
Both from benchmarks/bench_pretrain.py's counts. Pre-training: the encoder on the visible patches
and the class token, the decoder on all. Fine-tuning: the classifier on all patches and the class
token, with its head.
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import models_mae  # noqa: E402
import models_vit  # noqa: E402
from benchmarks.bench_pretrain import mae_train_flops, vit_train_flops  # noqa: E402
from util.registry import SHAPES_ONLY  # noqa: E402

# Dense bf16 8192^3 matrix products as measured on both kinds the device tool lends (its KINDS.md: H200 769-798,
# H100 798 TFLOP/s): the same Hopper matrix units. gpu_check.sh measures the GPU it runs on (--peak_tflops).
PEAK_TFLOPS = 790
MASK_RATIO = 0.75


def meta_mae(model: str, input_size: int) -> models_mae.MaskedAutoencoderViT:
    with torch.device("meta"):  # shapes only: nothing is allocated
        return models_mae.MODELS[model](img_size=input_size, **SHAPES_ONLY)


def pretrain_flops(model: str, input_size: int = 32, mask_ratio: float = MASK_RATIO) -> int:
    """Training FLOPs of one image of MAE pre-training."""
    return mae_train_flops(meta_mae(model, input_size), 1, mask_ratio)


def finetune_flops(model: str, input_size: int = 32, classes: int = 10) -> int:
    """Training FLOPs of one image of fine-tuning ``model``'s encoder: its classifier (the name
    without ``mae_``) with a ``classes``-way head."""
    with torch.device("meta"):
        factory = models_vit.MODELS[model.removeprefix("mae_")]
        classifier = factory(img_size=input_size, num_classes=classes, **SHAPES_ONLY)
    return vit_train_flops(classifier, 1)


# (command, [(what, images per epoch, epochs, runs, kind)]): the device commands of README.md, in order
def commands(pretrain_epochs: int, ft_epochs: int, ft10_epochs: int) -> list[tuple[str, list[tuple]]]:
    return [
        ("pretrain.sh", [("pre-training", 50_000, pretrain_epochs, 1, "pretrain")]),
        ("labels10.sh", [("fine-tune, 10% labels", 5_000, ft10_epochs, 4, "finetune")]),
        (
            "choose.sh",
            [("labels10-val", 5_000, ft10_epochs, 2, "finetune"), ("heldout", 45_000, ft_epochs, 1, "finetune")],
        ),
        ("labels100.sh 0", [("fine-tune, all labels", 50_000, ft_epochs, 2, "finetune")]),
        ("labels100.sh 1", [("fine-tune, all labels", 50_000, ft_epochs, 2, "finetune")]),
    ]


def minutes(
    model: str, mfu: float, pretrain_epochs: int, ft_epochs: int, ft10_epochs: int, peak_tflops: float = PEAK_TFLOPS
) -> list[tuple[str, float]]:
    """GPU-minutes of each command's training at ``mfu`` of ``peak_tflops`` (start-up, data and evaluation not
    counted)."""
    rate = mfu * peak_tflops * 1e12
    flops = {"pretrain": pretrain_flops(model), "finetune": finetune_flops(model)}
    return [
        (name, sum(images * epochs * runs * flops[kind] for _, images, epochs, runs, kind in parts) / rate / 60)
        for name, parts in commands(pretrain_epochs, ft_epochs, ft10_epochs)
    ]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="mae_vit_tiny_patch2")
    parser.add_argument("--mfu", type=float, default=0.15, help="model FLOP utilisation, of --peak_tflops")
    parser.add_argument(
        "--peak_tflops", type=float, default=PEAK_TFLOPS, help="the bf16 matmul rate --mfu is a fraction of"
    )
    parser.add_argument("--pretrain_epochs", type=int, default=160)
    parser.add_argument("--ft_epochs", type=int, default=30)
    parser.add_argument("--ft10_epochs", type=int, default=100)
    args = parser.parse_args()
    pre, fine = pretrain_flops(args.model), finetune_flops(args.model)
    rate = args.mfu * args.peak_tflops * 1e12
    print(f"{args.model}: {pre / 1e9:.2f} GFLOP per pre-training image, {fine / 1e9:.2f} per fine-tuning image")
    print(f"at {args.mfu:.0%} of {args.peak_tflops:g} TFLOP/s: {rate / pre:,.0f} and {rate / fine:,.0f} images/s")
    epochs = (args.pretrain_epochs, args.ft_epochs, args.ft10_epochs)
    plan = minutes(args.model, args.mfu, *epochs, args.peak_tflops)
    for name, mins in plan:
        print(f"| {name} | {mins:.1f} |")
    print(f"| total | {sum(m for _, m in plan):.1f} |")
