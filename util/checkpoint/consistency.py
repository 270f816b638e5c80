"""Checks of a run against the checkpoint it resumes: the model's kind, the flags that change what it learns
or which batches an epoch takes, the checkpoints its retention flags keep, its lr schedule, its training data
and classes. Each says what differs and what to do."""

import argparse
import os
from typing import Any

from util.checkpoint.files import checkpoint_name, kept_checkpoints, list_checkpoints, progress
from util.checkpoint.opening import Opened
from util.checkpoint.state import Position, TrainState
from util.cli.errors import fail
from util.cli.log import log
from util.data.datasets import listed_files, name_digest, paths_inside
from util.data.lists import ClassIndices
from util.lr_sched import lr_at

# The kinds of model state dict, told apart by their names: (what it holds, the command that writes it).
KINDS = {
    "mae": ("an MAE with decoder", "main_pretrain.py"),
    "probe": ("a linear probe", "main_linprobe.py"),
    "classifier": ("a fine-tuned classifier", "main_finetune.py"),
    "encoder": ("an encoder without decoder or head", ""),
}


# The weight of the linear head, whose rows are the classes, of the kinds that have one: the probe's head is a
# BatchNorm, then the linear layer.
HEAD_WEIGHTS = {"probe": "head.1.weight", "classifier": "head.weight"}


def kind_of(state: dict[str, Any]) -> str:
    """The KINDS key of a model state dict."""
    if any(k.startswith("decoder_") for k in state):
        return "mae"
    return next((kind for kind, key in HEAD_WEIGHTS.items() if key in state), "encoder")


def head_weight(state: dict[str, Any]) -> str | None:
    """The name of the linear head's weight in a model state dict; None for an MAE or an encoder, which have none."""
    return HEAD_WEIGHTS.get(kind_of(state))


def check_kind(saved: dict[str, Any], ours: str, path: str, evaluating: bool = False) -> None:
    """A --resume checkpoint of another kind than the model (``ours``, a KINDS key) is named as such, with the
    flag that takes it: a pre-training checkpoint given to --resume of a classifier is the usual slip, and
    listing its names against the model's would send the user to check --model and --input_size instead."""
    theirs = kind_of(saved)
    if theirs == ours:
        return
    if theirs in ("mae", "encoder") and ours in ("classifier", "probe") and not evaluating:
        advice = f"start from it with --finetune {path}"
    else:
        advice = f"give a checkpoint of {KINDS[ours][1]}"
    fail(f"--resume {path} holds {KINDS[theirs][0]}, not {KINDS[ours][0]}: {advice}")


# Flags that change what the model learns. A run resumed with another value goes on training
# something else than it started (--model and --input_size mostly cannot load: the weights differ).
# Fine-tuning's targets and regularisation count as --smoothing does: mixed targets, dropped paths.
MEANING_FLAGS = (
    *("model", "input_size", "mask_ratio", "norm_pix_loss", "global_pool", "nb_classes", "smoothing"),
    *("mixup", "cutmix", "drop_path"),
)


def check_flags(saved: argparse.Namespace | None, args: argparse.Namespace, path: str, mid_epoch: bool) -> None:
    """Warn about changed MEANING_FLAGS; inside an epoch, fail unless the batches are the same
    (``mid_epoch_change``): another seed, say, skips other samples, so that the epoch trains some twice
    and others not at all."""
    if saved is None:
        return
    changed = _changed_flags(saved, args, MEANING_FLAGS)
    if changed:
        log.warning(f"{path} was trained with other flags ({', '.join(changed)}); training goes on with the new ones")
    change = mid_epoch_change(saved, args) if mid_epoch else ""
    if change:
        fail(f"checkpoint {path} was {change}; resume with the same settings, or from an epoch-end checkpoint")


def mid_epoch_change(saved: argparse.Namespace | None, args: argparse.Namespace | None) -> str:
    """Why a run of ``args`` cannot go on inside an epoch from a checkpoint of ``saved`` flags ('' where it can):
    a position inside an epoch counts iterations, the same samples only with the same batch size, process count
    and accumulation, and the same seed (the epoch's order is drawn from it)."""
    for flag in ("batch_size", "world_size", "accum_iter", "seed"):
        then, now = getattr(saved, flag, None), getattr(args, flag, None)
        if then is not None and now is not None and then != now:
            name = "number of processes" if flag == "world_size" else f"--{flag}"
            return f"written inside an epoch with {name} {then}, this run has {now}"
    return ""


def _changed_flags(saved: argparse.Namespace, args: argparse.Namespace, flags: tuple[str, ...]) -> list[str]:
    """Each of ``flags`` both hold with another value, as warnings name it: ``--mask_ratio 0.75 -> 0.5``."""
    return [
        f"--{flag} {getattr(saved, flag)} -> {getattr(args, flag)}"
        for flag in flags
        if hasattr(saved, flag) and hasattr(args, flag) and getattr(saved, flag) != getattr(args, flag)
    ]


RETENTION_FLAGS = ("keep_last", "save_freq")


def check_retention(saved: argparse.Namespace | None, state: TrainState, position: Position) -> None:
    """Warn, naming them, about the checkpoints in ``--output_dir`` that the retention flags the run had
    kept and this run's prune once it saves the epoch it resumes: a resume that left out the run's
    --keep_last 0 (the same command with --resume auto, typed again) deleted all but the last and the
    --save_freq ones without a word."""
    args = state.args
    if not (_is_int(getattr(saved, "keep_last", None), 0) and _is_int(getattr(saved, "save_freq", None), 1)):
        return  # the official code's flags have neither (and a changed file might hold anything)
    changed = [flag for flag in RETENTION_FLAGS if getattr(saved, flag) != getattr(args, flag)]
    if not changed or not args.output_dir:
        return
    names = set(list_checkpoints(args.output_dir))
    if position.epoch < args.epochs:  # as they will be once that epoch's checkpoint is the newest
        names.add(os.path.join(args.output_dir, checkpoint_name(position.epoch)))
    paths = sorted(names, key=lambda path: progress(os.path.basename(path)))
    finals = state.extra.get("finals", [])
    before = kept_checkpoints(paths, saved.keep_last, saved.save_freq, getattr(saved, "epochs", 0) - 1, finals)
    after = kept_checkpoints(paths, args.keep_last, args.save_freq, args.epochs - 1, finals)
    if lost := [os.path.basename(p) for p in paths[:-1] if p in before and p not in after]:
        flags = ", ".join(f"--{flag} {getattr(saved, flag)} -> {getattr(args, flag)}" for flag in changed)
        log.warning(
            f"{flags}: this run's pruning deletes {', '.join(lost)} from {args.output_dir}, which the run kept so far; "
            f"give the run's {' and '.join(f'--{flag} {getattr(saved, flag)}' for flag in changed)} to keep them"
        )


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


# Flags of the lr schedule and the optimizer's settings: changed on resume, they apply from the resumed
# position on (extending a finished run with --epochs is one such change), and the lr may jump there.
SCHEDULE_FLAGS = ("epochs", "warmup_epochs", "blr", "min_lr", "weight_decay", "layer_decay")


def check_schedule(position: Position, iterations: int, args: argparse.Namespace) -> None:
    """Warn, naming each change, when the run's schedule differs from the checkpoint's it resumes, with the
    lr at the resumed position under both where they differ (the jump a changed --epochs, --warmup_epochs,
    --blr or number of processes makes there): silent, such a jump looked like a fault of the resume."""
    saved = position.source.args if position.source is not None else None
    if saved is None or position.epoch >= args.epochs:  # nothing left to train
        return
    changed = _changed_flags(saved, args, SCHEDULE_FLAGS)
    if isinstance(getattr(saved, "lr", None), float) and saved.lr != args.lr:  # --lr, --blr, the effective batch
        changed.append(f"peak lr {saved.lr:.3g} -> {args.lr:.3g}")
    then, now = _lr_at(position, iterations, saved), _lr_at(position, iterations, args)
    if then is not None and now is not None and then != now:
        changed.append(f"the lr at epoch {position.epoch}, iteration {position.step} is {now:.3g}, not {then:.3g}")
    if changed:
        log.warning(
            f"{position.source.path} was trained with another schedule ({'; '.join(changed)}); training goes on "
            f"with this run's"
        )


def _lr_at(position: Position, iterations: int, args: argparse.Namespace) -> float | None:
    """The lr ``args``' schedule gives at ``position`` (None where its flags lack one: not our checkpoint)."""
    if not all(isinstance(getattr(args, name, None), int | float) for name in ("lr", "min_lr", "warmup_epochs")):
        return None
    if not isinstance(getattr(args, "epochs", None), int):
        return None
    return lr_at(position.epoch + position.step / iterations, args)


def check_same_data(state: TrainState, dataset: Any, position: Position) -> None:
    """Record the training data in the state (image count, digest of the files' paths inside the folder
    that holds them all, in order: a moved folder, or a list file naming its files, is the same data); warn
    when a run resumed inside an epoch trains on other data than the checkpoint's: its position then counts
    iterations of another order. Class folders' names are recorded too, and a resume onto others refused
    (``check_same_classes``)."""
    files = listed_files(dataset)
    now: dict[str, Any] = {"images": len(files), "paths": name_digest(paths_inside(files))}
    classes = getattr(dataset, "classes", None)
    if classes is not None and not isinstance(classes, ClassIndices):  # a list file's labels are the indices
        now["classes"] = list(classes)
    saved = state.extra.get("data")
    if isinstance(saved, dict):
        check_same_classes(saved.get("classes"), now.get("classes"), position, state.args)
        # Checkpoints of earlier versions hold a digest of the file names alone ("digest"): only the
        # count is compared with theirs.
        changed = any(saved[key] != now[key] for key in ("images", "paths") if key in saved)
        if position.step and changed:
            log.warning(
                f"the training data changed since the checkpoint ({saved.get('images')} -> {now['images']} images, "
                f"or other files): epoch {position.epoch} goes on at iteration {position.step} of the new data's "
                f"order, so this epoch sees some images twice and others not at all; resume from an epoch-end "
                f"checkpoint to avoid it"
            )
    state.extra["data"] = now


def check_evaluated_classes(opened: Opened | None, dataset: Any, args: argparse.Namespace) -> None:
    """--eval: refuse validation class folders other than those the ``--resume`` checkpoint was trained on (its
    ``extra['data']``; nothing to compare with in one that records none, an official release): an evaluation reads
    no training split to compare them with, and renamed folders would score its outputs against other classes."""
    extra = opened.ckpt.get("extra") if opened is not None else None
    saved = extra.get("data") if isinstance(extra, dict) else None
    classes = getattr(dataset, "classes", None)
    if isinstance(saved, dict) and classes is not None and not isinstance(classes, ClassIndices):
        check_same_classes(saved.get("classes"), list(classes), Position(0, source=opened), args)


def check_same_classes(saved: Any, now: Any, position: Position, args: argparse.Namespace) -> None:
    """Refuse to resume a classifier whose class folders changed: a label is a class's position among the
    sorted folder names, so a renamed, removed or added folder gives the head's outputs other classes (a
    folder 'cat' renamed 'zebra' made the cat images label 2, the ship images label 1), trained on and scored
    without a word."""
    if not isinstance(saved, list) or now is None or saved == now:
        return
    label = next((i for i, (a, b) in enumerate(zip(saved, now, strict=False)) if a != b), min(len(saved), len(now)))
    before = saved[label] if label < len(saved) else "none"
    after = now[label] if label < len(now) else "none"
    source = position.source.path if position.source is not None else "the --resume checkpoint"
    afresh = "" if getattr(args, "eval", False) else ", or fine-tune afresh into another --output_dir"
    fail(
        f"--data_path {args.data_path}: the class folders differ from those {source} was trained on (label "
        f"{label}: {before} -> {after}): its outputs would mean other classes; give the data it was trained on "
        f"(the folders as they were){afresh}"
    )
