"""Mixed precision: the autocast context and a loss scaler that also clips and reports the norm."""

import contextlib
from collections.abc import Iterable

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on the device, or nothing for fp32."""
    if precision not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


class LossScaler:
    """Backward, optional gradient clipping and optimizer step, with loss scaling for fp16 only.

    bf16 has fp32's range, so it needs no scaling; the scaler is then a pass-through whose
    ``state_dict`` is empty (as is the official one's when scaling is off).
    """

    def __init__(self, precision: str):
        self.enabled = precision == "fp16"
        self._scaler = torch.amp.GradScaler("cuda", enabled=self.enabled)

    def __call__(
        self,
        loss: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        parameters: Iterable[torch.nn.Parameter],
        clip_grad: float | None = None,
        update: bool = True,
    ) -> torch.Tensor | None:
        """Backpropagate ``loss``; on ``update`` step the optimizer. Returns the gradient norm
        (a tensor, so that reading it is the caller's choice of when to synchronise)."""
        self._scaler.scale(loss).backward()
        if not update:
            return None
        self._scaler.unscale_(optimizer)
        params = [p for p in parameters if p.grad is not None]
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, clip_grad)
        else:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.detach()) for p in params]))
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict:
        return self._scaler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self._scaler.load_state_dict(state)
