"""Flags that a checkpoint decides when they are not given: the model, the image size and channels
(mean/std: util/data/normalization.py). A run that continues or starts from a checkpoint then
needs none of them, and a fine-tuned 32-px encoder is not silently resized to 224 px."""

import argparse
from collections.abc import Sequence
from typing import Any

import models_mae
from util.checkpoint.opening import Opened
from util.cli.log import log


def fill_from_checkpoints(
    args: argparse.Namespace, sources: Sequence[Opened], fallbacks: dict[str, Any]
) -> dict[str, str]:
    """Set every flag of ``fallbacks`` that is None (not given) to the value the first of ``sources``
    stores, else to its fallback; say in one line per checkpoint which values it gave. A stored
    ``--model`` becomes the fallback's kind: an MAE's its classifier's (fine-tuning, probing), a
    classifier's its MAE's (k-NN scoring of a fine-tuned or probed encoder). Returns where each
    stored value came from ({flag: "checkpoint PATH"}), for errors that blame the checkpoint, not
    a flag the user never gave."""
    taken: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    for flag, fallback in fallbacks.items():
        if getattr(args, flag, None) is not None:
            continue
        stored = [(s.path, found) for s in sources if (found := getattr(s.args, flag, None)) is not None]
        origin, value = stored[0] if stored else (None, fallback)
        if flag == "model" and origin:
            value = _same_kind(value, fallback)
        setattr(args, flag, value)
        if origin:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            taken.setdefault(origin, []).append(f"--{flag} {shown}")
            origins[flag] = f"checkpoint {origin}"
    for origin, values in taken.items():
        log.info(f"from checkpoint {origin}: {' '.join(values)} (flags not given)")
    return origins


def _same_kind(model: str, fallback: Any) -> str:
    """``model`` named as the kind of model ``fallback`` is: mae_vit_base_patch16 <-> vit_base_patch16."""
    encoder = models_mae.encoder_name(model)
    return f"mae_{encoder}" if str(fallback).startswith("mae_") else encoder
