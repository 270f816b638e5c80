"""Pre-training: one epoch of MAE training, and the reconstruction picture."""

import os
from argparse import Namespace

import torch

from util.checkpoint.state import TrainState
from util.cli.log import log
from util.data.normalization import normalize_on_device
from util.eval.pictures import reconstruction_grid, save_png
from util.lr_sched import adjust_learning_rate
from util.train.checkpointer import Checkpointer
from util.train.precision import autocast
from util.train.progress import RunLog
from util.train.steps import accumulating, optimizer_step, to_device


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    state: TrainState,
    epoch: int,
    checkpointer: Checkpointer,
    start_step: int = 0,
) -> dict[str, float]:
    """Train ``model`` (the MAE, possibly DDP-wrapped or compiled) for the rest of ``epoch``, from
    iteration ``start_step`` on; returns the epoch's average loss and lr over every rank's iterations."""
    args, optimizer, scaler = state.args, state.optimizer, state.scaler
    device = torch.device(args.device)
    model.train(True)
    progress = checkpointer.epoch(epoch, start_step, len(loader))
    accumulation = progress.accumulation
    for step, (imgs, _) in progress.iterate(loader):  # labels are not used
        if accumulation.starts(step):  # the lr follows the schedule per optimizer step
            lr = adjust_learning_rate(optimizer, epoch + step / progress.total, args)
        imgs = normalize_on_device(to_device(imgs, device), args.mean, args.std)  # uint8 from the fast loaders
        update = accumulation.ends(step)
        with accumulating(model, update):
            with autocast(args.precision, args.device):
                loss, _, _ = model(imgs, mask_ratio=args.mask_ratio)
            scaler.scale(loss / accumulation.size(step)).backward()
        if update:
            optimizer_step(model, optimizer, scaler, args.clip_grad)
        progress.after_step(step, loss, lr)  # logs; at check points: finiteness, mid-epoch saves, stops
    return progress.averages()


def log_reconstructions(
    model: torch.nn.Module, imgs: torch.Tensor, noise: torch.Tensor, epoch: int, run_log: RunLog, args: Namespace
) -> None:
    """Write the picture of fixed images (normalised with ``--mean``/``--std``) under a fixed mask
    to TensorBoard and ``reconstruction-<epoch>.png`` in ``--output_dir``. A picture that cannot be
    written is a warning: the training it shows is already saved."""
    picture = reconstruction_grid(model, imgs, noise, args.mask_ratio, args.mean, args.std)
    run_log.image("reconstructions", picture, (epoch + 1) * 1000)  # the scalars' axis: the end of ``epoch``
    if not args.output_dir:
        return
    path = os.path.join(args.output_dir, f"reconstruction-{epoch}.png")
    if run_log.write_optional(path, lambda: save_png(picture, path)):
        log.info(f"reconstructions: {path}")
