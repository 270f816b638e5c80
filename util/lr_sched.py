"""Per-iteration learning-rate schedule: linear warm-up, then half-cycle cosine to ``min_lr``."""

import math
from argparse import Namespace

import torch


def lr_at(epoch: float, args: Namespace) -> float:
    """The learning rate at a fractional epoch (iteration / iterations per epoch)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    if epoch >= args.epochs:  # past the schedule (or no cosine part at all): its floor
        return args.min_lr
    # The official expression in its order of operations: pi * (e - w) / (E - w) rounds otherwise
    # than pi * ((e - w) / (E - w)), and the lr would then differ in its last bit at ~20% of steps.
    cosine = math.cos(math.pi * (epoch - args.warmup_epochs) / (args.epochs - args.warmup_epochs))
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + cosine)


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: float, args: Namespace) -> float:
    """Set every group's lr to the schedule's value times its ``lr_scale`` (layer decay)."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr
