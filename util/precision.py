"""Mixed precision: the autocast context and a loss scaler that also clips and reports the norm."""

import contextlib
from collections.abc import Iterable

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_FRESH_SCALER_STATE = {
    "scale": 65536.0,
    "growth_factor": 2.0,
    "backoff_factor": 0.5,
    "growth_interval": 2000,
    "_growth_tracker": 0,
}


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
        """Backpropagate ``loss``; on ``update`` step the optimizer. With ``clip_grad``, returns the
        gradient norm before clipping (a tensor: reading it is the caller's choice of when to sync)."""
        self._scaler.scale(loss).backward()
        if not update:
            return None
        self._scaler.unscale_(optimizer)
        norm = None
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], clip_grad)
        self._scaler.step(optimizer)
        self._scaler.update()
        return norm

    def state_dict(self) -> dict:
        # The official code restores an *enabled* GradScaler from this entry, which refuses an
        # empty dict: without fp16, save a fresh scaler's state (what it would start from).
        return self._scaler.state_dict() if self.enabled else dict(_FRESH_SCALER_STATE)

    def load_state_dict(self, state: dict) -> None:
        if self.enabled and state:
            self._scaler.load_state_dict(state)
