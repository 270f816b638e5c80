"""Pre-training: the MAE loss of a batch, one epoch of training, and the reconstruction picture."""

import os
from collections.abc import Sequence

import torch

from util.checkpoint import TrainState
from util.data import IMAGENET_MEAN, IMAGENET_STD
from util.fast_crop import normalize_on_device
from util.logger import RunLog
from util.train_loop import train_one_epoch as _train_one_epoch
from util.visualize import reconstruction_grid, save_png


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
    model: torch.nn.Module,
    imgs: torch.Tensor,
    noise: torch.Tensor,
    mask_ratio: float,
    epoch: int,
    output_dir: str,
    run_log: RunLog | None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> str | None:
    """Write the picture of fixed images (normalised with ``mean``/``std``) under a fixed mask to
    TensorBoard and a PNG."""
    picture = reconstruction_grid(model, imgs, noise, mask_ratio, mean, std)
    if run_log is not None:
        run_log.image("reconstructions", picture, epoch)
    if not output_dir:
        return None
    path = os.path.join(output_dir, f"reconstruction-{epoch}.png")
    save_png(picture, path)
    return path
