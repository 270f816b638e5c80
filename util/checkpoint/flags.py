"""Flags that a checkpoint decides when they are not given: the model, the image size and channels
(mean/std: util/data/normalization.py), and for a classifier the run continues, its classes and pooling.
A run that continues or starts from a checkpoint then needs none of them, and a fine-tuned 32-px
encoder is not silently resized to 224 px. Official releases store no flags: their weights' shapes
tell the model, the image size and the channels, and a classifier's head and norms the rest."""

import argparse
from collections.abc import Sequence
from typing import Any

import models_mae
import models_vit
from util.checkpoint.consistency import head_weight
from util.checkpoint.load import model_state
from util.checkpoint.opening import Opened
from util.cli.errors import fail
from util.cli.log import log

# The flags a checkpoint that stores none (an official release) gives through its weights' shapes, where
# the entry point has them (knn_eval.py has no --in_chans: it reads RGB images).
FROM_WEIGHTS = ("model", "input_size", "in_chans")
# The flags that only the checkpoint a run continues (--resume) decides, and only through its weights, where they
# hold a classifier's or a probe's head: the rows of its head and whether it has fc_norm (global pooling) or the
# final norm are what the model must have to load it, args or not (the official fine-tuned releases store none).
# A --finetune checkpoint decides neither: it starts a new head, of the run's classes and pooling.
FROM_RESUMED_HEAD = ("nb_classes", "global_pool")


def fill_from_checkpoints(
    args: argparse.Namespace, sources: Sequence[Opened], fallbacks: dict[str, Any], resumed: Opened | None = None
) -> dict[str, str]:
    """Set every flag of ``fallbacks`` that is None (not given) to the value the first of ``sources``
    that decides it gives, else to its fallback (a function of ``args`` gives (where from, value)); say in one
    line per checkpoint (or other source) which values it gave.
    A checkpoint decides what its args store; one that stores no args (an official release), the
    model, image size and channels of its weights (``recognised``). ``FROM_RESUMED_HEAD`` come from the
    weights of ``resumed`` (the ``--resume`` checkpoint) alone (``head_flags``). A decided ``--model`` becomes the
    fallback's kind: an MAE's its classifier's (fine-tuning, probing), a classifier's its MAE's (k-NN
    scoring of a fine-tuned or probed encoder). Returns where each value taken came from ({flag:
    "checkpoint PATH" or "the weights of checkpoint PATH"}), for errors that blame the checkpoint, not
    a flag the user never gave."""
    taken: dict[str, list[str]] = {}
    origins: dict[str, str] = {}
    weights: dict[str, dict[str, Any]] = {}  # what the weights of each checkpoint without args are, once read
    head: dict[str, Any] | None = None  # the flags the head of ``resumed`` gives, once read
    for flag, fallback in fallbacks.items():
        if getattr(args, flag, None) is not None:
            continue
        if flag in FROM_RESUMED_HEAD:
            if head is None:
                head = head_flags(resumed) if resumed is not None else {}
            decided = (_origin(resumed), head[flag]) if flag in head else None
        else:
            decided = _decided(args, flag, sources, weights)
        origin, value = decided or ("", fallback)
        if callable(value):  # a fallback read elsewhere (a classifier's classes: its data's class folders)
            origin, value = value(args)
        if flag == "model" and origin:
            value = _same_kind(value, fallback)
        setattr(args, flag, value)
        if origin:
            taken.setdefault(origin, []).append(_shown(flag, value))
            origins[flag] = origin
    for origin, values in taken.items():
        log.info(f"from {origin}: {' '.join(values)} (flags not given)")
    return origins


def _shown(flag: str, value: Any) -> str:
    """``flag`` with ``value`` as it is typed: ``--input_size 32 48``, ``--global_pool`` or ``--cls_token``."""
    if flag == "global_pool":
        return "--global_pool" if value else "--cls_token"
    return f"--{flag} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}"


def _origin(source: Opened) -> str:
    """Where a value of ``source`` is said to come from: its weights where it stores no args."""
    return f"checkpoint {source.path}" if source.args is not None else f"the weights of checkpoint {source.path}"


def head_flags(source: Opened) -> dict[str, Any]:
    """{"nb_classes": its head's rows, "global_pool": whether it pools (fc_norm, no final norm)} of the weights
    of ``source`` where they hold a classifier's head (``head.weight``) or a linear probe's (a BatchNorm, then
    ``head.1.weight``); {} where they hold none (an MAE, an encoder: the load names what they are)."""
    state = model_state(source.ckpt, source.path)
    head = state.get(head_weight(state))
    if head is None or head.dim() != 2 or not head.shape[0]:
        return {}
    found: dict[str, Any] = {"nb_classes": int(head.shape[0])}
    if ("fc_norm.weight" in state) != ("norm.weight" in state):  # both or neither: the load says what differs
        found["global_pool"] = "fc_norm.weight" in state
    return found


def _decided(
    args: argparse.Namespace, flag: str, sources: Sequence[Opened], weights: dict[str, dict[str, Any]]
) -> tuple[str, Any] | None:
    """(where from, value) of ``flag`` from the first of ``sources`` that decides it: its args, else
    its weights (recognised once per checkpoint, into ``weights``); None where none does."""
    for source in sources:
        if source.args is not None:
            if (stored := getattr(source.args, flag, None)) is not None:
                return _origin(source), stored
        elif flag in FROM_WEIGHTS:
            if source.path not in weights:
                weights[source.path] = recognised(source, args.model)
            if weights[source.path]:
                return _origin(source), weights[source.path][flag]
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
