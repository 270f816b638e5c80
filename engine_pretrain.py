"""Pre-training: the MAE loss of a batch, one epoch of training, and the reconstruction picture."""

import os
from argparse import Namespace

import torch

from util.checkpoint.state import TrainState
from util.data.normalization import normalize_on_device
from util.eval.pictures import reconstruction_grid, save_png
from util.train.loop import train_one_epoch as _train_one_epoch
from util.train.progress import RunLog


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    state: TrainState,
    epoch: int,
    run_log: RunLog | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    mask_ratio, mean, std = state.args.mask_ratio, state.args.mean, state.args.std

    def mae_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        imgs, _ = batch  # labels are not used
        imgs = normalize_on_device(imgs, mean, std)  # uint8 from the fast loader (--mean/--std)
        loss, _, _ = model(imgs, mask_ratio=mask_ratio)
        return loss

    return _train_one_epoch(model, loader, state, epoch, mae_loss, run_log, start_step)


def log_reconstructions(
    model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, epoch: int, run_log: RunLog, args: Namespace
) -> str | None:
    """Write the picture of fixed images (normalised with ``--mean``/``--std``) under a fixed mask
    to TensorBoard and ``reconstruction-<epoch>.png`` in ``--output_dir``; returns the PNG's path."""
    picture = reconstruction_grid(model, imgs, noise, args.mask_ratio, args.mean, args.std)
    run_log.image("reconstructions", picture, epoch)
    if not args.output_dir:
        return None
    path = os.path.join(args.output_dir, f"reconstruction-{epoch}.png")
    save_png(picture, path)
    return path
