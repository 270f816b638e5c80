"""Linear probing of a pre-trained MAE encoder: the encoder is frozen, and a linear head behind a
BatchNorm without affine parameters is trained with LARS (the paper's protocol).

    torchrun --nproc_per_node=8 main_linprobe.py --data_path /path/to/imagenet --model vit_base_patch16 \
        --cls_token --finetune mae_pretrain_vit_base.pth --batch_size 512 --accum_iter 4 --epochs 90 \
        --blr 0.1 --weight_decay 0.0 --dist_eval
"""

import argparse
from collections.abc import Callable

import torch

import models_vit
from engine_finetune import classifier_and_data, fallbacks, train_or_evaluate
from util.cli.args import (
    add_classifier_args,
    add_eval_args,
    add_run_args,
    add_schedule_args,
    check_classifier_args,
    check_common,
)
from util.cli.errors import fail, run_cli
from util.cli.log import log
from util.data.channels import OneDrawResizedCrop, tensor_train_transform
from util.data.normalization import add_norm_args
from util.lars import LARS
from util.train.run import gives_back_output_dir, start

FALLBACKS = fallbacks(global_pool=False)  # the official default pooling


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("MAE linear probing for image classification")
    add_schedule_args(parser, batch_size=512, epochs=90, weight_decay=0.0, blr=0.1, min_lr=0.0, warmup_epochs=10)
    add_classifier_args(parser, models_vit.MODELS, FALLBACKS)
    add_run_args(parser)
    add_norm_args(parser)
    add_eval_args(parser)
    return parser


def check_args(args: argparse.Namespace) -> None:
    """The flags' own checks, before anything starts (the SLURM launcher runs them before submitting)."""
    check_common(args)
    check_classifier_args(args)
    # The probe's BatchNorm normalises each training batch by its spread, which one image lacks.
    if args.batch_size < 2 and not args.eval:
        fail(f"--batch_size must be at least 2 for the linear probe (its BatchNorm needs 2), got {args.batch_size}")


def build_train_transform(args: argparse.Namespace) -> Callable:
    """Weak augmentation (the official probe's one-draw crop, and flip): the probe measures the
    representation, not the augmentation. RGB as PIL images; other channel counts as float tensors
    of the files' own channels."""
    rgb = args.in_chans == 3
    return tensor_train_transform(args.input_size, tuple(args.scale), args.mean, args.std, rgb, OneDrawResizedCrop)


def add_probe_head(model: models_vit.VisionTransformer) -> None:
    """The paper's probe: BatchNorm without affine parameters in front of the linear classifier, which
    alone trains (the encoder is frozen)."""
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("head.")


def build_optimizer(model: models_vit.VisionTransformer, args: argparse.Namespace) -> LARS:
    """LARS over the probe's head, as the official probe."""
    return LARS(model.head.parameters(), lr=args.lr, weight_decay=args.weight_decay)


@gives_back_output_dir
def main(flags: argparse.Namespace) -> None:
    check_args(flags)
    run = start(flags, FALLBACKS, kind="probe")
    args = run.args
    model, train_set, val_set = classifier_and_data(run, build_train_transform(args), head_init_std=0.01)
    add_probe_head(model)
    run.place(model)  # after add_probe_head: the frozen encoder is sized as frozen
    log.info(f"trainable parameters: {[n for n, p in model.named_parameters() if p.requires_grad]}")

    optimizer = build_optimizer(model, args)
    train_or_evaluate(run, model, optimizer, train_set, val_set, torch.nn.CrossEntropyLoss())


if __name__ == "__main__":
    run_cli(lambda: main(get_args_parser().parse_args()))
