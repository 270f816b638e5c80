"""Resume: the checkpoint --resume names (a path, or with 'auto' the newest good one in --output_dir, the
same on every rank), and a run's state restored from it, with the checks of consistency.py."""

import argparse
import os
import sys
from typing import Any

from util.checkpoint.consistency import check_flags, check_retention, mid_epoch_change
from util.checkpoint.files import list_checkpoints, progress
from util.checkpoint.load import model_state
from util.checkpoint.opening import Opened, open_checkpoint, open_on_every_rank
from util.checkpoint.rng import restore_rng
from util.checkpoint.state import Position, TrainState
from util.checkpoint.weights import load_model_strict
from util.claim import appears
from util.cli.errors import UserError, fail
from util.cli.log import log
from util.train import distributed


def find_resumable(output_dir: str, args: argparse.Namespace | None = None) -> Opened | None:
    """The newest checkpoint in ``output_dir`` that loads, and that a run of ``args`` can resume; a newer one
    that is broken, or was written inside an epoch with other batches (``mid_epoch_change``), is reported and
    skipped. The second happens to a job torchrun restarts on fewer nodes (``--nnodes 1:2``): refused, the
    checkpoint failed every restart the same way; the epoch-end one before it loses that epoch's iterations."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            opened = open_checkpoint(path, training=True)
        except UserError as e:
            log.warning(f"skipping {path}: {e}")
            continue
        change = mid_epoch_change(opened.args, args) if opened.ckpt.get("step") is not None else ""
        if not change:
            return opened
        log.warning(f"skipping {path}: it was {change}, and its position counts the batches of those settings")
    return None


# How long a rank waits for the checkpoint rank 0 resumes to show in its own view of --output_dir: an NFS
# client caches what a folder holds for up to a minute (acdirmax), and a requeued job starts within seconds.
APPEAR_WAIT_S = 60.0
SHARED_OUTPUT_DIR = "put --output_dir on storage every node of the job shares, not on a node's local disk"


def open_resume(args: argparse.Namespace) -> Opened | None:
    """The checkpoint of ``--resume`` (a path, or for 'auto' the newest good one in ``--output_dir``),
    the same one on every rank (``open_on_every_rank``). For 'auto' rank 0 chooses: a node with a stale
    view of the folder (an NFS client's cache) or a folder of its own (a local disk) would otherwise
    resume another checkpoint than rank 0's, and DDP, which copies rank 0's weights, would hide it
    (other optimizer states, random states and positions: a silent divergence, or a hang at the end)."""
    if not args.resume:
        return None
    if args.resume != "auto":
        return open_on_every_rank(lambda: open_checkpoint(args.resume, training=True), args.resume, "--resume")
    if not args.output_dir:  # the run would start from scratch, and say "no checkpoint in ," at every restart
        fail("--resume auto takes the newest checkpoint in --output_dir, and --output_dir '' keeps none: give one")
    found = find_resumable(args.output_dir, args) if distributed.is_main_process() else None
    path = distributed.from_main(found.path if found else None)
    if path is None and getattr(args, "eval", False):  # else the random initial weights would be scored
        fail(
            f"--eval --resume auto: no checkpoint in {args.output_dir} to evaluate (a run there has not saved one "
            f"yet); give --resume CHECKPOINT"
        )
    if path is None:
        log.info(f"--resume auto: no checkpoint in {args.output_dir}, starting from scratch")
        return None

    def open_here() -> Opened:
        return found or open_checkpoint(_appeared(path, APPEAR_WAIT_S), training=True)

    return open_on_every_rank(open_here, path, "--resume auto", SHARED_OUTPUT_DIR)


def _appeared(path: str, seconds: float) -> str:
    """``path``, once this process sees it or after ``seconds`` (saying on stderr that it waits)."""
    if not os.path.exists(path):
        sys.stderr.write(
            f"rank {distributed.rank()}: waiting up to {seconds:g} s for {path}, which rank 0 resumes, to show here\n"
        )
        appears(path, seconds)
    return path


def weights_only(ckpt: dict[str, Any]) -> bool:
    """Whether a --resume checkpoint holds weights only (no optimizer state or progress): training starts
    afresh from them, at --start_epoch."""
    return "optimizer" not in ckpt or "epoch" not in ckpt


def resume(state: TrainState, opened: Opened | None) -> Position:
    """Restore ``state`` from the ``--resume`` checkpoint ``opened``; returns where training goes on. Its kind
    (an MAE, a classifier, a probe) was checked as the run started (``util.train.run.start``'s ``kind``)."""
    args, evaluating = state.args, getattr(state.args, "eval", False)
    start = Position(args.start_epoch)
    if opened is None:
        return start
    path, ckpt = opened.path, opened.ckpt
    saved = model_state(ckpt, path)
    load_model_strict(state.model, saved, path)
    log.info(f"resumed model from {path}")
    if weights_only(ckpt) or evaluating:
        # Weights only (an official release, a .safetensors file, or --eval): train from --start_epoch.
        if not evaluating:
            log.warning(
                f"{path} holds weights only (no optimizer state or progress): training starts "
                f"from them at epoch {start.epoch}; this is not an exact resume"
            )
        return start
    state.load_state_dict(ckpt, path)
    restore_rank_rng(ckpt, path)
    step = ckpt.get("step")
    check_flags(opened.args, args, path, mid_epoch=step is not None)
    epoch = ckpt["epoch"] + 1 if step is None else ckpt["epoch"]  # after a complete epoch: the next one
    position = Position(epoch, step or 0, resumed=True, source=opened.flags_only())
    if step is None:
        keep_if_final(state, opened)
    check_retention(opened.args, state, position)
    if args.resume != "auto":
        warn_if_not_newest(args.output_dir, path, position)
    log.info(f"resuming at epoch {position.epoch}, iteration {position.step}")
    return position


def restore_rank_rng(ckpt: dict[str, Any], path: str) -> None:
    """This rank's random state from ``ckpt``, which stores one per process of the run that wrote it;
    a warning where it cannot be restored, since the resume is then not exact."""
    rng = ckpt.get("rng")
    if rng and len(rng) == distributed.world_size():
        restore_rng(rng[distributed.rank()])
    elif rng:
        log.warning(
            f"{path} was written by {len(rng)} processes, this run has "
            f"{distributed.world_size()}: random state is not restored, so resume is not exact"
        )
    else:  # the official code's full checkpoints: masks, crops and drop paths are drawn afresh
        log.warning(f"{path} holds no random state (the official code saves none): resume is not exact")


def warn_if_not_newest(output_dir: str, path: str, position: Position) -> None:
    """Warn where a --resume PATH is not the newest checkpoint of ``output_dir``: --resume auto would go on
    from another one. (For --resume auto itself, later checkpoints are those that did not load, reported as
    skipped already.)"""
    here = (position.epoch, position.step)
    later = [p for p in list_checkpoints(output_dir) if progress(os.path.basename(p)) > here]
    if later:
        log.warning(
            f"{output_dir} holds checkpoints beyond {path} ({os.path.basename(later[-1])}); "
            f"--resume auto would take those, not this run's"
        )


def keep_if_final(state: TrainState, opened: Opened) -> None:
    """Keep for good the epoch-end checkpoint ``opened`` where it ended its run's schedule and this run, in
    the same folder, goes beyond it (a finished run extended with a larger --epochs): that run's flags kept
    it as its last, and pruning by this run's --epochs deleted the finished run's result at the first save.
    Recorded in ``extra['finals']``, which the run's checkpoints carry, so that a restart keeps it too."""
    args, epoch = state.args, opened.ckpt["epoch"]
    ended = opened.args is not None and getattr(opened.args, "epochs", None) == epoch + 1
    if not (ended and args.epochs > epoch + 1 and args.output_dir and os.path.isdir(args.output_dir)):
        return
    folder = os.path.dirname(os.path.abspath(opened.path))
    if not (os.path.isfile(opened.path) and os.path.samefile(folder, args.output_dir)):
        return  # a URL's copy, or a checkpoint elsewhere: this run's pruning never reaches it
    finals = state.extra.setdefault("finals", [])
    if (name := os.path.basename(opened.path)) not in finals:
        finals.append(name)
