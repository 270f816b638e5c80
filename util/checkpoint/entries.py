"""What a checkpoint's entries must hold, checked before any code uses them: the stored flags that code
reads back (at every load: load.py), and the training entries a resume restores (optimizer state,
random states, meters, log, entry-point state). A malformed one is a one-line error naming it."""

import argparse
import json
import math
from collections.abc import Callable
from typing import Any

import torch

from util.checkpoint.rng import capture_rng, restore_rng
from util.cli.errors import fail
from util.sizes import MAX_SIDE


# Training entries, checked before a resume uses them
def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: Any) -> bool:
    return _is_count(value) and value > 0


def _is_input_size(value: Any) -> bool:
    sides = value if isinstance(value, (list, tuple)) else [value]
    return 1 <= len(sides) <= 2 and all(_is_positive_int(s) and s <= MAX_SIDE for s in sides)


def _is_numbers(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and bool(value) and all(map(_is_number, value))


# The stored flags that code reads back from a checkpoint's args (flags not given, --mean/--std,
# reconstruct.py, export.py, the resume warning), each with what it must be, as the flag gives it:
# JSON metadata (.safetensors) turns tuples into lists, which pass. None is "not stored".
_SAVED_FLAGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model": (lambda v: isinstance(v, str), "a model name"),
    "input_size": (_is_input_size, f"one or two integers from 1 to {MAX_SIDE}"),
    "in_chans": (_is_positive_int, "a positive integer"),
    "mean": (_is_numbers, "a list of numbers"),
    "std": (_is_numbers, "a list of numbers"),
    "mask_ratio": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "norm_pix_loss": (lambda v: isinstance(v, bool), "True or False"),
    "global_pool": (lambda v: isinstance(v, bool), "True or False"),
    "nb_classes": (_is_positive_int, "a positive integer"),
    "crop_pct": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
}


def check_saved_args(args: argparse.Namespace, path: str) -> None:
    """The stored flags that other code reads back from a checkpoint (``_SAVED_FLAGS``) hold values
    the flags could have given (``--mean "abc"`` would be read as three characters, ``--input_size
    "abc"`` fail deep inside a model); fail naming every one that does not, with its stored value."""
    values = vars(args)
    problems = [
        f"--{flag} {values[flag]!r} is not {what}"
        for flag, (valid, what) in _SAVED_FLAGS.items()
        if values.get(flag) is not None and not valid(values[flag])
    ]
    if problems:
        fail(
            f"checkpoint {path} stores flag values this code cannot use: {'; '.join(problems)}; it was not written "
            f"by this code or was changed: give another checkpoint"
        )


def _rng_problem(rng: Any) -> str:
    """Why ``rng`` is not a list of states ``restore_rng`` takes: each is tried, then ours put back."""
    if not isinstance(rng, list) or not all(isinstance(r, dict) for r in rng):
        return f"is a {type(rng).__name__}, not a list of per-process random states"
    mine = capture_rng()
    try:
        for r in rng:
            restore_rng(r)
    except Exception as e:  # any part of any state may be wrong
        return f"is not the random state this code saves ({type(e).__name__}: {str(e)[:60]})"
    finally:
        restore_rng(mine)
    return ""


def _optimizer_problem(opt: Any) -> str:
    if not isinstance(opt, dict) or not isinstance(opt.get("state"), dict):
        return f"is a {type(opt).__name__} without a 'state' dict, not an optimizer state"
    groups = opt.get("param_groups")
    if not isinstance(groups, list) or not all(
        isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups
    ):
        return "has no list of parameter groups with their 'params'"
    for index, slots in opt["state"].items():  # per parameter: step, moments, ...
        if not isinstance(slots, dict) or not all(isinstance(v, torch.Tensor) or _is_number(v) for v in slots.values()):
            return f"holds for parameter {index} something else than tensors and numbers"
        for name, v in slots.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
                return f"holds NaN or infinite values in {name} of parameter {index} (a diverged run)"
    return ""


def _meters_problem(meters: Any) -> str:
    sums = meters.get("sums") if isinstance(meters, dict) else None
    per_rank = sums if isinstance(sums, list) and sums else [sums]  # one dict per rank; older checkpoints: rank 0's
    ok = all(map(_is_sums, per_rank)) and _is_count(meters.get("epoch")) and _is_count(meters.get("step"))
    return "" if ok else "is not {'epoch': count, 'step': count, 'sums': [{name: [total, count]} per rank]}"


def _is_sums(sums: Any) -> bool:
    pairs = sums.values() if isinstance(sums, dict) else [None]
    return all(isinstance(s, (list, tuple)) and len(s) == 2 and all(map(_is_number, s)) for s in pairs)


def _log_problem(lines: Any) -> str:
    if not isinstance(lines, list) or not all(isinstance(line, dict) for line in lines):
        return f"is a {type(lines).__name__}, not a list of log.txt lines (dicts)"
    try:
        json.dumps(lines, allow_nan=True)
    except (TypeError, ValueError) as e:
        return f"holds values log.txt cannot take ({e})"
    return ""


def _extra_problem(extra: Any) -> str:
    """The entry-point state: engine_finetune keeps 'max_accuracy' there, it and pre-training's k-NN monitor
    'unevaluated' (``Checkpointer.end_epoch_before_evaluating``), and a run that
    extends a finished one the names of the final checkpoints it keeps ('finals')."""
    if not isinstance(extra, dict):
        return f"is a {type(extra).__name__}, not a dict"
    best = extra.get("max_accuracy", 0.0)
    if not _is_number(best) or not math.isfinite(best):
        return f"holds max_accuracy {best!r}, not a number"
    pending = extra.get("unevaluated")
    if pending is not None and not (
        isinstance(pending, dict) and _is_count(pending.get("epoch")) and isinstance(pending.get("train_stats"), dict)
    ):
        return "holds an 'unevaluated' entry that is not {'epoch': count, 'train_stats': dict}"
    finals = extra.get("finals", [])
    if not isinstance(finals, list) or not all(isinstance(name, str) for name in finals):
        return "holds a 'finals' entry that is not a list of checkpoint names"
    return ""


# Each training entry's check: why its value is malformed, '' if it is not.
_ENTRY_CHECKS = {
    "epoch": lambda v: "" if _is_count(v) else f"is {v!r}, not a count of epochs (an integer >= 0)",
    "step": lambda v: "" if v is None or _is_count(v) else f"is {v!r}, not None or an integer >= 0",
    "optimizer": _optimizer_problem,
    "scaler": lambda v: "" if not v or isinstance(v, dict) else f"is a {type(v).__name__}, not a dict",
    "rng": lambda v: "" if v is None else _rng_problem(v),
    "extra": _extra_problem,
    "log": lambda v: "" if v is None else _log_problem(v),
    "meters": lambda v: "" if v is None else _meters_problem(v),
    "args": lambda v: "" if v is None or isinstance(v, argparse.Namespace) else "is not a Namespace of flags",
}


def check_training_entries(ckpt: dict[str, Any], path: str) -> None:
    """Fail in one line naming every malformed entry of a training checkpoint before resume uses any
    of them. Absent entries are not checked: an official release holds only the model (and args)."""
    checked = ((name, check(ckpt[name])) for name, check in _ENTRY_CHECKS.items() if name in ckpt)
    if problems := [f"'{name}' {why}" for name, why in checked if why]:
        fail(
            f"checkpoint {path} has malformed entries: {'; '.join(problems)}; it was not written by this code "
            f"or was changed: resume from another checkpoint"
        )
