"""Flags that a checkpoint decides when they are not given: the model, the image size and channels
(mean/std: util/data/normalization.py). A run that continues or starts from a checkpoint then
needs none of them, and a fine-tuned 32-px encoder is not silently resized to 224 px. Official
releases store no flags: their weights' shapes tell the model, the image size and the channels."""

import argparse
from collections.abc import Sequence
from typing import Any

import models_mae
import models_vit
from util.checkpoint.load import model_state
from util.checkpoint.opening import Opened
from util.cli.errors import fail
from util.cli.log import log

# The flags a checkpoint that stores none (an official release) gives through its weights' shapes, where
# the entry point has them (knn_eval.py has no --in_chans: it reads RGB images).
FROM_WEIGHTS = ("model", "input_size", "in_chans")


def fill_from_checkpoints(
    args: argparse.Namespace, sources: Sequence[Opened], fallbacks: dict[str, Any]
) -> dict[str, str]:
    """Set every flag of ``fallbacks`` that is None (not given) to the value the first of ``sources``
    that decides it gives, else to its fallback; say in one line per checkpoint which values it gave.
    A checkpoint decides what its args store; one that stores no args (an official release), the
    model, image size and channels of its weights (``recognised``). A decided ``--model`` becomes the
    fallback's kind: an MAE's its classifier's (fine-tuning, probing), a classifier's its MAE's (k-NN
    scoring of a fine-tuned or probed encoder). Returns where each value taken came from ({flag:
    "checkpoint PATH" or "the weights of checkpoint PATH"}), for errors that blame the checkpoint, not
    a flag the user never gave."""
    taken: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    weights: dict[str, dict[str, Any]] = {}  # what the weights of each checkpoint without args are, once read
    for flag, fallback in fallbacks.items():
        if getattr(args, flag, None) is not None:
            continue
        origin, value = _decided(args, flag, sources, weights) or ("", fallback)
        if flag == "model" and origin:
            value = _same_kind(value, fallback)
        setattr(args, flag, value)
        if origin:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            taken.setdefault(origin, []).append(f"--{flag} {shown}")
            origins[flag] = origin
    for origin, values in taken.items():
        log.info(f"from {origin}: {' '.join(values)} (flags not given)")
    return origins


def _decided(
    args: argparse.Namespace, flag: str, sources: Sequence[Opened], weights: dict[str, dict[str, Any]]
) -> tuple[str, Any] | None:
    """(where from, value) of ``flag`` from the first of ``sources`` that decides it: its args, else
    its weights (recognised once per checkpoint, into ``weights``); None where none does."""
    for source in sources:
        if source.args is not None:
            if (stored := getattr(source.args, flag, None)) is not None:
                return f"checkpoint {source.path}", stored
        elif flag in FROM_WEIGHTS:
            if source.path not in weights:
                weights[source.path] = recognised(source, args.model)
            if weights[source.path]:
                return f"the weights of checkpoint {source.path}", weights[source.path][flag]
    return None


def recognised(source: Opened, model: str | None) -> dict[str, Any]:
    """{"model": a models_vit name, "input_size": a square's side, "in_chans": its patch embedding's
    input channels} of the classifier whose encoder has the shapes of the weights of ``source``, a
    checkpoint that stores no args; of ``model`` (an MAE's or a classifier's name) where given, else {}
    where it does not fit. Only the encoder is compared: an
    MAE's decoder and a classifier's head (``--nb_classes`` rows) are set aside, and a fine-tuned
    classifier's ``fc_norm`` tells its pooling (``--global_pool``: the flags' pooling must not hide
    the model; loading says where it differs). Without ``model`` every known model is built on the
    meta device, uninitialised (a fraction of a second for all; done only where a flag is missing), and
    weights that fit none are refused in one line: the fallback model would be refused by the load, named
    though nobody gave it."""
    names = None
    if model is not None:
        names = [models_mae.encoder_name(model)]
        if names[0] not in models_vit.MODELS:
            return {}  # an unknown --model: the entry point refuses it in one line where it builds the model
    state = model_state(source.ckpt, source.path)
    found = models_vit.encoder_for_weights(state, names)
    if found is None and model is None:
        fail(
            f"checkpoint {source.path} stores no --model, and its weights fit no known encoder "
            f"(at a square image size); give --model"
        )
    if not found:
        return {}
    # A fit is built at the channels of the patch embedding [dim, C, p, p], which a fit therefore has.
    return {"model": found[0], "input_size": found[1], "in_chans": state["patch_embed.proj.weight"].shape[1]}


def _same_kind(model: str, fallback: Any) -> str:
    """``model`` named as the kind of model ``fallback`` is: mae_vit_base_patch16 <-> vit_base_patch16."""
    encoder = models_mae.encoder_name(model)
    return f"mae_{encoder}" if str(fallback).startswith("mae_") else encoder
