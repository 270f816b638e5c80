"""Classification: one training epoch, evaluation, and the epoch loop shared by fine-tuning and
linear probing."""

import argparse
import time
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset

from util.checkpoint.state import Position, TrainState, resume, save_checkpoint
from util.cli.log import log
from util.data.datasets import eval_loader, train_loader
from util.train import distributed, interrupt, run
from util.train.loop import train_one_epoch as _train_one_epoch
from util.train.precision import LossScaler, autocast
from util.train.progress import RunLog, format_duration


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    state: TrainState,
    epoch: int,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
    run_log: RunLog | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    def classification_loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        samples, targets = batch
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        return criterion(model(samples), targets)

    return _train_one_epoch(model, loader, state, epoch, classification_loss, run_log, start_step)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace) -> dict[str, float]:
    """Top-1/top-5 accuracy (%) and mean cross-entropy. With ``--dist_eval`` each rank scores its
    own shard (no padding) and the sums are added over ranks, so every image counts once."""
    model.eval()
    device = torch.device(args.device)
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1, top-5, images
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(args.precision, args.device):
            logits = model(images)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top.eq(targets.unsqueeze(1))
        sums += torch.stack(
            [
                criterion(logits, targets).double(),
                hits[:, :1].sum().double(),
                hits.any(dim=1).sum().double(),
                torch.full((), len(targets), dtype=torch.float64, device=device),  # no host-to-device copy
            ]
        )
    loss, top1, top5, count = distributed.all_reduce_sum(sums.tolist(), device) if args.dist_eval else sums.tolist()
    stats = {"acc1": 100.0 * top1 / count, "acc5": 100.0 * top5 / count, "loss": loss / count, "images": int(count)}
    log.info(
        f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({stats['images']} images)"
    )
    return stats


def train_or_evaluate(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    args: argparse.Namespace,
    train_set: Dataset,
    val_set: Dataset,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
) -> None:
    """Resume (``--resume``), wrap for DDP/compile, then evaluate only (``--eval``) or train."""
    state = TrainState(model, optimizer, LossScaler(args.precision), args)
    position = resume(state)
    wrapped_model = run.wrap_for_training(model, args)  # DDP and/or compiled: what the steps call
    val_loader = eval_loader(val_set, args)
    if args.eval:
        evaluate(wrapped_model, val_loader, args)
    else:
        fit(wrapped_model, state, position, train_loader(train_set, args), val_loader, criterion, mixup_fn)
    distributed.cleanup()


def fit(
    wrapped_model: torch.nn.Module,
    state: TrainState,
    position: Position,
    train_loader: DataLoader,
    val_loader: DataLoader,
    criterion: torch.nn.Module,
    mixup_fn: Callable | None = None,
) -> None:
    """Train from ``position`` to ``args.epochs``, evaluating after every epoch and keeping the
    best top-1 in the checkpoint (``extra['max_accuracy']``).

    An epoch is checkpointed before it is evaluated, so that a failing evaluation (a bad
    validation image, say) cannot cost the epoch. Its checkpoint thus holds the best top-1 of the
    epochs before it, and the epoch's training stats under ``extra['unevaluated']``: a run
    resumed from it evaluates that epoch first, and logs it, as the uninterrupted run did.
    """
    args = state.args
    run_log = RunLog(args.log_dir, args.output_dir, state.log)  # rewrites log.txt from the checkpoint
    state.extra.setdefault("max_accuracy", 0.0)
    begin = time.time()
    try:
        pending = state.extra.get("unevaluated")
        if pending is not None and position == Position(pending["epoch"] + 1):
            _evaluate_epoch(wrapped_model, val_loader, state, run_log)
        for epoch, start_step in run.epochs_left(position, train_loader, args):
            train_stats = train_one_epoch(
                wrapped_model, train_loader, state, epoch, criterion, mixup_fn, run_log, start_step
            )
            state.extra["unevaluated"] = {"epoch": epoch, "train_stats": train_stats}
            path = save_checkpoint(state, epoch)
            if run.stop_requested(args):
                raise interrupt.Interrupted(path)  # stop now: the resumed run evaluates this epoch
            _evaluate_epoch(wrapped_model, val_loader, state, run_log)
    finally:
        run_log.close()
    log.info(f"training time {format_duration(time.time() - begin)}")


def _evaluate_epoch(wrapped_model: torch.nn.Module, val_loader: DataLoader, state: TrainState, run_log: RunLog) -> None:
    """Evaluate the epoch in ``extra['unevaluated']`` (the model is as it ended) if ``--eval_freq``
    asks for it, update the best top-1 and append the epoch's line to log.txt. The last epoch's
    checkpoint is written again, so that the run's final checkpoint holds the best top-1 of every
    epoch. (A stop asked for while evaluating is taken at the next epoch's first check point.)"""
    args = state.args
    pending = state.extra.pop("unevaluated")
    epoch = pending["epoch"]
    if (epoch + 1) % args.eval_freq and epoch != args.epochs - 1:
        run_log.epoch({**{f"train_{k}": v for k, v in pending["train_stats"].items()}, "epoch": epoch})
        return
    test_stats = evaluate(wrapped_model, val_loader, args)
    best = state.extra["max_accuracy"] = max(state.extra["max_accuracy"], test_stats["acc1"])
    log.info(
        f"accuracy of the network on the {test_stats['images']} test images: {test_stats['acc1']:.1f}%; "
        f"max accuracy: {best:.2f}%"
    )
    run_log.scalars(
        epoch,
        **{
            "perf/test_acc1": test_stats["acc1"],
            "perf/test_acc5": test_stats["acc5"],
            "perf/test_loss": test_stats["loss"],
        },
    )
    stats = {
        **{f"train_{k}": v for k, v in pending["train_stats"].items()},
        **{f"test_{k}": v for k, v in test_stats.items()},
        "max_accuracy": best,
    }
    run_log.epoch({**stats, "epoch": epoch})
    if epoch == args.epochs - 1:
        save_checkpoint(state, epoch)
