"""The official MAE code, imported from the folder benchmarks/fetch_official.sh extracts, for the
side-by-side rows of gpu_check.sh and the CPU recipe check official_parity.py.

It is patched at import time only, never edited on disk, and only where current releases refuse
it: timm >= 0.9 dropped ``Block``'s ``qk_scale`` argument (it was None, the default scale, anyway),
torch 2 removed ``torch._six`` (whose ``inf`` is math's), numpy 1.24 the alias ``np.float`` (of
python's float, i.e. float64), and timm >= 0.9's ``VisionTransformer.forward`` pools the features
again after the official ``forward_features`` has pooled them (timm 0.3.2's was ``head(forward_features(x))``,
which the official classifier is given back). Its attention modules run
``fused_attn = False`` unless asked otherwise: timm 0.3.2, which the official code pins, had only
the explicit softmax(QK^T)V, while timm >= 0.9 gives the same blocks fused attention.
"""

import contextlib
import functools
import importlib
import math
import os
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy
import timm.models.vision_transformer as timm_vit
import torch
from torch import nn

import models_mae

OFFICIAL_DIR = Path(os.environ.get("MAE_OFFICIAL_DIR", Path(__file__).resolve().parent / "official_mae"))
# Names the official files import that this repository has too: swapped out while they load.
_SHARED_NAMES = ("util", "models_mae", "models_vit", "engine_pretrain", "engine_finetune")
# The modules load() imports (an attribute each, named by the file's last part); fetch_official.sh extracts them.
MODULES = (
    "models_mae", "models_vit", "engine_pretrain", "engine_finetune",
    "util.misc", "util.lr_sched", "util.lr_decay", "util.lars", "util.pos_embed",
)  # fmt: skip


class OfficialCode(types.SimpleNamespace):
    """The official modules of MODULES, by their files' names: ``models_mae``, ..., ``misc``, ..., ``pos_embed``."""


def missing_reason() -> str | None:
    """Why the official code cannot be loaded (one line), or None."""
    for module in MODULES:
        path = OFFICIAL_DIR / (module.replace(".", "/") + ".py")
        if not path.is_file():
            fetch = "bash benchmarks/fetch_official.sh PATH_TO_MAE_CLONE"
            return f"no {path.name} of the official code in {OFFICIAL_DIR}: run {fetch}"
    return None


class _NumpyWithFloat(types.ModuleType):
    """numpy, with the ``np.float`` alias that the official pos_embed.py still uses."""

    float = float

    def __getattr__(self, name: str) -> Any:
        return getattr(numpy, name)


def _block_without_qk_scale(*args: Any, qk_scale: float | None = None, **kwargs: Any) -> nn.Module:
    if qk_scale is not None:  # the official models all pass None; anything else would change the model
        raise ValueError(f"qk_scale={qk_scale} has no equivalent in timm >= 0.9")
    return timm_vit.Block(*args, **kwargs)


def _forward_of_timm_0_3_2(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return self.head(self.forward_features(x))


@contextlib.contextmanager
def _official_import_path() -> Iterator[None]:
    """The official folder first on sys.path, this repository's same-named modules set aside (and
    put back after: the official modules keep references to their own)."""
    saved = {n: m for n, m in sys.modules.items() if n.split(".")[0] in _SHARED_NAMES}
    for name in saved:
        del sys.modules[name]
    sys.modules["torch._six"] = types.ModuleType("torch._six")
    sys.modules["torch._six"].inf = math.inf
    # The official util/ has no __init__.py: a namespace package, which this repository's util
    # package would win over wherever it sits on sys.path. Named here, it cannot.
    sys.modules["util"] = types.ModuleType("util")
    sys.modules["util"].__path__ = [str(OFFICIAL_DIR / "util")]
    sys.path.insert(0, str(OFFICIAL_DIR))
    try:
        yield
    finally:
        sys.path.remove(str(OFFICIAL_DIR))
        del sys.modules["torch._six"]
        for name in [n for n in sys.modules if n.split(".")[0] in _SHARED_NAMES]:
            del sys.modules[name]
        sys.modules.update(saved)


_LOADED: list[OfficialCode] = []


def load() -> OfficialCode:
    """The official modules (loaded once per process)."""
    if not _LOADED:
        reason = missing_reason()
        if reason:
            raise FileNotFoundError(reason)
        with _official_import_path():
            code = OfficialCode(**{name.split(".")[-1]: importlib.import_module(name) for name in MODULES})
        code.models_mae.Block = _block_without_qk_scale
        code.pos_embed.np = _NumpyWithFloat("numpy")
        code.models_vit.VisionTransformer.forward = _forward_of_timm_0_3_2
        _LOADED.append(code)
    return _LOADED[0]


def official_model(ours: models_mae.MaskedAutoencoderViT, fused_attn: bool = False) -> nn.Module:
    """The official MaskedAutoencoderViT of ``ours``'s architecture, with ``ours``'s weights."""
    code = load()
    block, dec_block = ours.blocks[0], ours.decoder_blocks[0]
    # Built on ours' device: its initialisation, which the weights loaded below replace, took 3.4-4.4 s on a
    # CPU for ViT-L/16 (the step part builds four), and moments on a GPU.
    with torch.device(ours.pos_embed.device):
        model = code.models_mae.MaskedAutoencoderViT(
            img_size=ours.img_size,
            patch_size=ours.patch_size,
            in_chans=ours.in_chans,
            embed_dim=ours.decoder_embed.in_features,
            depth=len(ours.blocks),
            num_heads=block.attn.num_heads,
            decoder_embed_dim=ours.decoder_embed.out_features,
            decoder_depth=len(ours.decoder_blocks),
            decoder_num_heads=dec_block.attn.num_heads,
            mlp_ratio=block.mlp.fc1.out_features / block.mlp.fc1.in_features,
            norm_layer=functools.partial(nn.LayerNorm, eps=ours.norm.eps),
            norm_pix_loss=ours.norm_pix_loss,
        )
    for module in model.modules():
        if isinstance(module, timm_vit.Attention):
            module.fused_attn = fused_attn
    model.load_state_dict(ours.state_dict())  # strict: the same names and shapes, or an error
    return model


def same_loss(ours: nn.Module, official: nn.Module, imgs: torch.Tensor, mask_ratio: float) -> tuple[float, float]:
    """Both models' fp32 losses on ``imgs`` under the same masking noise (the official model draws
    it with ``torch.rand`` inside, so the generator is seeded alike before each)."""
    losses = []
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # both in true fp32, so that only a real difference shows
    try:
        for model in (ours, official):
            with torch.random.fork_rng(devices=[imgs.device] if imgs.is_cuda else []), torch.no_grad():
                torch.manual_seed(1234)
                losses.append(model(imgs, mask_ratio=mask_ratio)[0].item())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return losses[0], losses[1]
