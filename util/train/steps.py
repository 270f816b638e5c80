"""The pieces of a training step that every trainer shares: which micro-batches an optimizer step
covers, DDP's all-reduce only when it steps, and the step itself (unscale, clip, step)."""

import contextlib
from dataclasses import dataclass
from typing import Any

import torch

from util.train.precision import LossScaler


@dataclass(frozen=True)
class Accumulation:
    """Gradient accumulation over ``every`` (``--accum_iter``) iterations of an epoch of ``total``.

    When ``total`` is not a multiple of ``every``, the epoch's last group is shorter: it still steps,
    with the mean gradient of the micro-batches it has, so that no computed gradient is thrown away."""

    every: int
    total: int

    def starts(self, step: int) -> bool:
        return step % self.every == 0

    def ends(self, step: int) -> bool:
        return (step + 1) % self.every == 0 or step == self.total - 1

    def size(self, step: int) -> int:
        """Micro-batches in ``step``'s group: each one's loss is divided by it."""
        return min(self.every, self.total - (step - step % self.every))


def accumulating(model: torch.nn.Module, update: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on the micro-steps that do not step: gradients are all-reduced once per step."""
    no_sync = getattr(model, "no_sync", None)
    return no_sync() if no_sync is not None and not update else contextlib.nullcontext()


def optimizer_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scaler: LossScaler, clip_grad: float | None
) -> None:
    """Clip the true (unscaled) gradients if asked, step (the fp16 scaler skips a step whose
    gradients overflowed), update the loss scale, and drop the gradients."""
    if clip_grad is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors, and objects that move themselves (util.data.device_decode.EncodedBatch decodes on
    the way), go to ``device``; lists and tuples are followed."""
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if hasattr(batch, "to"):
        return batch.to(device, non_blocking=True)
    return batch
