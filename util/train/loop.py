"""One training epoch, shared by pre-training, fine-tuning and linear probing.

The engines supply the loss of a batch; this loop does what they have in common: the
per-iteration learning rate, mixed precision, gradient accumulation without all-reduce on the
micro-steps that do not step, the check for non-finite losses, logging, and stopping at an
exact position when a checkpoint is asked for (preemption or ``--ckpt_every_steps``).

Host synchronisation happens only at check points (every ``print_freq`` iterations), so the
GPU is never waited on at every step.
"""

import contextlib
import math
from argparse import Namespace
from collections.abc import Callable
from typing import Any

import torch

from util.checkpoint.state import TrainState, save_checkpoint
from util.cli.errors import NonFiniteLoss, lower_lr  # NonFiniteLoss is in errors: checkpoints raise it too
from util.lr_sched import adjust_learning_rate
from util.train import distributed, interrupt, run
from util.train.precision import LossScaler, autocast
from util.train.progress import MetricLogger, RunLog, SmoothedValue


def train_one_epoch(
    model: torch.nn.Module,
    loader: torch.utils.data.DataLoader,
    state: TrainState,
    epoch: int,
    compute_loss: Callable[[Any], torch.Tensor],
    run_log: RunLog | None = None,
    start_step: int = 0,
) -> dict[str, float]:
    """Train ``model`` (possibly DDP-wrapped) for the rest of ``epoch`` from ``start_step``.

    ``compute_loss(batch)`` runs the forward pass (under autocast) and returns the mean loss.
    """
    args: Namespace = state.args
    optimizer, scaler = state.optimizer, state.scaler
    assert isinstance(scaler, LossScaler)
    device = torch.device(args.device)
    model.train(True)
    metrics = MetricLogger()
    metrics.add_meter("lr", SmoothedValue(window=1, fmt="{value:.6f}"))
    saved = state.meters  # the epoch's sums up to a mid-epoch checkpoint this run resumed from
    if start_step and saved and (saved["epoch"], saved["step"]) == (epoch, start_step):
        metrics.load_sums(saved["sums"])  # the epoch's average then covers all its iterations
    state.meters = None
    total = start_step + len(loader)
    pending: list[torch.Tensor] = []
    optimizer.zero_grad(set_to_none=True)

    header = f"Epoch: [{epoch}]"
    for step, batch in enumerate(metrics.log_every(loader, args.print_freq, header, total, start_step), start_step):
        if step % args.accum_iter == 0:
            lr = adjust_learning_rate(optimizer, epoch + step / total, args)
        batch = _to_device(batch, device)
        update = (step + 1) % args.accum_iter == 0
        no_sync = getattr(model, "no_sync", None)
        sync_ctx = no_sync() if (no_sync is not None and not update) else contextlib.nullcontext()
        with sync_ctx:
            with autocast(args.precision, args.device):
                loss = compute_loss(batch)
            scaler.scale(loss / args.accum_iter).backward()
        if update:
            if args.clip_grad is not None:
                scaler.unscale_(optimizer)  # clip the true gradients, not the fp16-scaled ones
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad)
            scaler.step(optimizer)  # skipped by the fp16 scaler when a gradient overflowed
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        pending.append(loss.detach())

        last = step == total - 1
        log_now = (step + 1) % args.print_freq == 0 or last
        ckpt_now = bool(args.ckpt_every_steps) and (step + 1) % args.ckpt_every_steps == 0
        if update and (log_now or ckpt_now):
            # Finiteness first: a checkpoint must never hold weights a bad step produced.
            _check_and_log(pending, step, epoch, total, lr, metrics, run_log, args)
            pending = []
            stop = run.stop_requested(args)
            if (ckpt_now or stop) and not last:
                # Rank 0's sums: only rank 0 logs.
                state.meters = {"epoch": epoch, "step": step + 1, "sums": metrics.sums()}
                path = save_checkpoint(state, epoch, step + 1)
                state.meters = None
                if stop:
                    raise interrupt.Interrupted(path)
    if pending:  # iterations after the last check point (the epoch did not end on one)
        _check_and_log(pending, total - 1, epoch, total, lr, metrics, run_log, args)
    return metrics.global_averages()


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, and objects that move themselves (util.data.device_decode.EncodedBatch decodes on the
    way), go to ``device``; lists and tuples are followed."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(b, device) for b in batch)
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    return batch


def _check_and_log(
    losses: list[torch.Tensor],
    step: int,
    epoch: int,
    total: int,
    lr: float,
    metrics: MetricLogger,
    run_log: RunLog | None,
    args: Namespace,
) -> None:
    """One host sync: read the pending losses, stop on a non-finite one, log the averages."""
    values = torch.stack(losses).float().cpu().tolist()
    first = step + 1 - len(values)
    bad = [(first + i, v) for i, v in enumerate(values) if not math.isfinite(v)]
    # All ranks stop together; one rank stopping alone would leave the others hanging.
    summed = distributed.all_reduce_sum([float(len(bad)), sum(values) if not bad else 0.0, len(values)], args.device)
    if summed[0] > 0:
        where = f"iteration {bad[0][0]}" if bad else "another rank"
        raise NonFiniteLoss(
            f"loss is {bad[0][1] if bad else 'not finite'} at epoch {epoch}, {where}; stopping without "
            f"saving, so the last checkpoint stays intact. Lower {lower_lr(args)}, or try --precision bf16/fp32"
        )
    for v in values:
        metrics.update(loss=v)
    metrics.update(lr=lr)
    if run_log is not None:
        epoch_1000x = int((epoch + (step + 1) / total) * 1000)  # the official x-axis
        run_log.scalars(epoch_1000x, train_loss=summed[1] / summed[2], lr=lr)
