"""Mixed precision: the autocast context, the fp16 loss scaler, and the CUDA math training runs with."""

import contextlib

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(precision: str, device: str) -> contextlib.AbstractContextManager:
    """Autocast to bf16/fp16 on the device, or nothing for fp32."""
    if precision not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def fast_cuda_math(tf32: bool = True) -> None:
    """cuDNN's autotuning and, with ``tf32``, TensorFloat-32 for fp32 matrix products and
    convolutions on CUDA: how training runs (the benchmarks measure the same settings)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32


class LossScaler(torch.amp.GradScaler):
    """torch's GradScaler, on for fp16 only (bf16 has fp32's range: the scaler is then a pass-through)."""

    def __init__(self, precision: str):
        super().__init__("cuda", enabled=precision == "fp16")

    def state_dict(self) -> dict:
        # The official code restores an *enabled* GradScaler from this entry, which refuses an
        # empty dict: without fp16, save the state an enabled scaler starts from (a CPU one's: no GPU needed).
        return super().state_dict() if self.is_enabled() else torch.amp.GradScaler("cpu").state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.is_enabled() and state:
            super().load_state_dict(state)
