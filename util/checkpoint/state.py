"""Training checkpoints: what a run saves (``TrainState``), the check before a save, and resume.

Format: a dict with the official keys ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``, plus
``step`` (iterations done in ``epoch``; ``None`` once it is complete), ``rng`` (each rank's random
state, for exact resume) and entry-point ``extra`` state."""

import argparse
import errno
import os
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from util.checkpoint.files import atomic_save, checkpoint_name, kept_checkpoints, list_checkpoints, progress, prune
from util.checkpoint.load import (
    cached_path,
    check_training_entries,
    is_url,
    load_checkpoint,
    load_model_strict,
    model_state,
)
from util.checkpoint.rng import gather_rng, restore_rng
from util.cli.errors import NonFiniteLoss, UserError, divergence_advice, fail
from util.cli.log import log
from util.data.datasets import listed_files, name_digest, paths_inside
from util.data.lists import ClassIndices
from util.lr_sched import lr_at
from util.outputs import appears
from util.train import distributed


@dataclass
class TrainState:
    """What a training loop needs to save and restore besides the model weights."""

    model: torch.nn.Module  # the unwrapped model (no DDP, no compile wrapper)
    optimizer: torch.optim.Optimizer
    scaler: Any  # util.train.precision.LossScaler
    args: argparse.Namespace
    extra: dict[str, Any] = field(default_factory=dict)
    # log.txt's lines of the epochs done (None: resumed from a checkpoint older than this history,
    # whose log.txt is only appended to); the log is rewritten from it on resume.
    log: list[dict[str, Any]] | None = field(default_factory=list)
    # The running sums of the epoch's logged averages at a mid-epoch position (the Checkpointer sets them
    # before a mid-epoch save), so that a resumed epoch logs the average of all its iterations.
    meters: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """Its checkpoint entries, the official keys first (``save_checkpoint`` adds position and RNG)."""
        states = {name: getattr(self, name).state_dict() for name in ("model", "optimizer", "scaler")}
        return {**states, "args": self.args, "extra": self.extra, "log": self.log, "meters": self.meters}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        """Restore what ``state_dict`` saved, except the model (``resume`` loads it strictly first,
        from any kind of checkpoint) and the args (this run's flags are the ones that count)."""
        # torch's load_state_dict replaces each group's settings by the saved ones: a --weight_decay or
        # --layer_decay (lr_scale) given on resume was silently dropped, while the args saved claimed it. The lr
        # stays the checkpoint's: the schedule sets it at each step, and a run that saves again before its first
        # step (fine-tuning's last epoch, evaluated on resume) must save the lr that epoch ended with.
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(_groups_in_order(ckpt["optimizer"], self.optimizer.param_groups))
        except (ValueError, KeyError) as e:
            fail(f"checkpoint {path}: its optimizer state does not fit this model and optimizer ({e})")
        for group, own in zip(self.optimizer.param_groups, settings, strict=True):
            group.update(own)  # the state (moments, step counts) is the checkpoint's, the settings this run's flags
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.extra.update(ckpt.get("extra", {}))
        self.log, self.meters = ckpt.get("log"), ckpt.get("meters")  # log: None in checkpoints older than it


def _groups_in_order(saved: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved optimizer state with its groups, and the parameters inside them, in this optimizer's order,
    matched by the parameter names both record. torch pairs groups and parameters by position alone, and the
    classifier's registration order changed (fine-tuning checkpoints written before 314a7bd list ``fc_norm``
    before ``head``): their top layer's groups came in the other order, a size mismatch on resume. A state
    without names, or whose names do not match, is returned as it is (torch's check then names the misfit)."""
    saved_groups = saved.get("param_groups") if isinstance(saved, dict) else None
    named = [g for g in saved_groups or [] if isinstance(g, dict) and isinstance(g.get("names"), list)]
    if not saved_groups or len(named) != len(saved_groups) or not all("names" in g for g in groups):
        return saved
    if not all(isinstance(n, str) for g in named for n in g["names"]):  # a changed file: torch's check names it
        return saved
    by_names = {frozenset(g["names"]): g for g in saved_groups}
    if len(by_names) != len(saved_groups) or any(frozenset(g["names"]) not in by_names for g in groups):
        return saved
    ordered = []
    for group in groups:
        old = by_names[frozenset(group["names"])]
        ids = dict(zip(old["names"], old["params"], strict=True))
        ordered.append({**old, "names": list(group["names"]), "params": [ids[n] for n in group["names"]]})
    return {**saved, "param_groups": ordered}


def save_checkpoint(state: TrainState, epoch: int, step: int | None = None) -> str | None:
    """Save on rank 0 and return the path, on every rank (all ranks call: RNG states are gathered; a rank
    that stops names it as the place to continue from, in its own node's log); a runaway update is not
    saved. A write rank 0 fails (a full disk) stops every rank with its line: the others would otherwise
    go on, and one stopping on request would name a checkpoint that was never written."""
    args = state.args
    name = checkpoint_name(epoch, step)
    check_finite(state, f"the end of epoch {epoch}" if step is None else f"epoch {epoch}, iteration {step}", name)
    rng = gather_rng()
    if not args.output_dir:
        return None
    path = os.path.join(args.output_dir, name)

    def write() -> None:  # rank 0's
        obj = {**state.state_dict(), "epoch": epoch, "step": step, "rng": rng}
        if step is None:
            obj["meters"] = None  # an epoch's running sums belong to mid-epoch positions only
        _write_checkpoint(obj, path, args.output_dir)
        prune_checkpoints(state, just_written=path)

    distributed.on_rank_0_for_every_rank(write)
    return path


def _write_checkpoint(obj: dict[str, Any], path: str, output_dir: str) -> None:
    """``atomic_save``; a failed write (a full disk, a quota) is one line with the room it needs."""
    try:
        atomic_save(obj, path)
    except OSError as e:
        if not os.path.isdir(output_dir):  # removed under the run (a clean-up, a purged scratch space), or moved
            fail(
                f"cannot write checkpoint {path}: --output_dir {output_dir} was removed or moved while this run "
                f"wrote to it, and the checkpoints it held with it: restore it and continue with --resume auto, or "
                f"start again"
            )
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):  # remounted read-only, permissions taken: not room
            fail(
                f"cannot write checkpoint {path}: {e.strerror or e}: --output_dir {output_dir} no longer takes files; "
                f"the earlier checkpoints are intact: make it writable again (or copy them to another --output_dir) "
                f"and continue with --resume auto"
            )
        free = shutil.disk_usage(output_dir).free
        fail(
            f"cannot write checkpoint {path}: {e.strerror or e} (it needs about {_tensor_bytes(obj) / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free there); the earlier checkpoints are intact: free space (or choose "
            f"another --output_dir) and continue with --resume auto"
        )


def prune_checkpoints(state: TrainState, just_written: str | None = None) -> None:
    """Apply the retention flags (``--keep_last``, ``--save_freq``) to ``--output_dir`` on rank 0; the final
    checkpoints of the runs this one extends (``extra['finals']``) stay too."""
    args = state.args
    if distributed.is_main_process() and args.output_dir:
        finals = state.extra.get("finals", [])
        prune(args.output_dir, args.keep_last, args.save_freq, args.epochs - 1, just_written, finals)


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(map(_tensor_bytes, children))


def check_finite(state: TrainState, where: str, name: str) -> None:
    """Stop (on every rank) unless the weights, buffers and optimizer state are finite: this checks the
    updates, once per save. One fused norm per device and dtype: NaN or inf if an element is, and inf
    in float32 past ~1e19 too, which the next forward pass would overflow anyway (runaway weights)."""
    tensors = [t for t in state.model.state_dict().values() if t.is_floating_point()]
    for per_param in state.optimizer.state_dict()["state"].values():
        tensors += [t for t in per_param.values() if isinstance(t, torch.Tensor) and t.is_floating_point()]
    groups: dict[tuple[torch.device, bool], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype == torch.float64), []).append(t)
    finite = all(
        bool(torch.stack(torch._foreach_norm(g, 2, dtype=None if double else torch.float32)).isfinite().all())
        for (_, double), g in groups.items()
    )
    if distributed.any_rank(not finite, state.args.device):
        raise NonFiniteLoss(
            f"weights or optimizer state are not finite at {where} (a runaway update); stopping without "
            f"saving {name}, so the last checkpoint stays intact. {divergence_advice(state.args)}"
        )


@dataclass(frozen=True)
class Opened:
    """A checkpoint read once, at start-up, and handed to whatever needs it (resume, encoder, flags)."""

    path: str
    ckpt: dict[str, Any]

    @property
    def args(self) -> argparse.Namespace | None:  # None for official releases, which store none
        saved = self.ckpt.get("args")
        return saved if isinstance(saved, argparse.Namespace) else None

    def flags_only(self) -> "Opened":
        """The path and the saved flags, without the weights and optimizer state: what may outlive the loading."""
        return Opened(self.path, {"args": self.ckpt.get("args")})


def open_checkpoint(path: str, training: bool = False) -> Opened:
    """Read ``path`` (verified, weights only); ``training``: to resume, its training entries checked."""
    ckpt = load_checkpoint(path)
    if training:
        check_training_entries(ckpt, path)
    return Opened(path, ckpt)


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
SHARED_CHECKPOINT = "give a checkpoint on storage every node of the job shares, or the same file on each node"


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


def open_on_every_rank(
    open_here: Callable[[], Opened], path: str, flag: str, advice: str = SHARED_CHECKPOINT
) -> Opened:
    """``open_here()`` on every rank, which must all read the same checkpoint ``path`` (each node reads
    its own view of the files). A rank that cannot, or a file that differs between ranks (its progress,
    its size), stops every rank with the same line, which ``advice`` ends; where no rank can read it,
    each says why as a single process would."""
    if is_url(path):
        download_on_every_rank(path, flag)
    try:
        opened, error = open_here(), None
    except UserError as e:
        opened, error = None, e
    if not distributed.is_dist():
        if error is not None:
            raise error
        return opened
    seen = distributed.gather(("error", str(error)) if error is not None else ("read", _fingerprint(opened)))
    failed = [rank for rank, (kind, _) in enumerate(seen) if kind == "error"]
    if error is not None and len(failed) == len(seen):
        raise error
    size = len(seen)
    if failed:
        read = [rank for rank in range(size) if rank not in failed]
        why = seen[failed[0]][1]
        # A URL's copies are in each rank's torch.hub cache: what to do is in the reason (a damaged copy).
        tail = "" if is_url(path) else f": every node of the job must see the same files; {advice}"
        fail(
            f"{flag} {path}: rank(s) {distributed.listed_ranks(failed)} of {size} cannot read it ({why}), rank(s) "
            f"{distributed.listed_ranks(read)} can{tail}"
        )
    if any(fingerprint != seen[0][1] for _, fingerprint in seen):
        shown = "; ".join(f"rank {rank}: {fingerprint}" for rank, (_, fingerprint) in enumerate(seen))
        fail(
            f"{flag} {path} is not the same file on every rank ({shown}): every node of the job must see the same "
            f"files; {advice}"
        )
    return opened


def download_on_every_rank(url: str, flag: str) -> None:
    """Put ``url``'s copy into every rank's cache, downloading it once per cache, not once per rank
    (eight ranks of a node fetching the same gigabyte at once): rank 0 first, so that a cache the
    whole job shares is filled once; then, round by round, the lowest rank of each machine whose
    cache still lacks it, while the others wait. A downloader loads its copy once while they wait,
    so that one that does not load (truncated, an HTML page) is removed before any other rank reads
    it: removed later, a rank sharing the cache downloaded it again or found it gone. A failed or
    damaged download stops every rank with the downloader's line."""
    if not distributed.is_dist():
        return
    machine, downloaders = socket.gethostname(), {0}
    for _ in range(distributed.world_size()):  # each round fills at least one more rank's cache
        error = None
        if distributed.rank() in downloaders and not os.path.isfile(cached_path(url)):
            try:
                load_checkpoint(url)  # downloads it, and removes a copy that does not load
            except UserError as e:
                error = str(e)
        seen = distributed.gather((machine, os.path.isfile(cached_path(url)), error))
        if failed := [(rank, error) for rank, (_, _, error) in enumerate(seen) if error]:
            rank, error = failed[0]
            fail(f"{flag}: rank {rank} of {len(seen)}: {error}")
        first_lacking: dict[str, int] = {}  # machine -> its lowest rank without a copy
        for rank, (host, has_it, _) in enumerate(seen):
            if not has_it:
                first_lacking.setdefault(host, rank)
        if not first_lacking:
            return
        downloaders = set(first_lacking.values())
    fail(f"{flag} {url}: downloaded, yet some ranks cannot see their copy in torch.hub's cache; check its folder")


def _fingerprint(opened: Opened) -> str:
    """What tells two copies of a checkpoint apart cheaply: its position and its size in bytes."""
    step, epoch = opened.ckpt.get("step"), opened.ckpt.get("epoch")
    where = "no epoch" if epoch is None else f"epoch {epoch}" + ("" if step is None else f" iteration {step}")
    size = os.path.getsize(opened.path) if os.path.isfile(opened.path) else None
    return where if size is None else f"{where}, {size} bytes"


@dataclass
class Position:
    epoch: int
    step: int = 0  # iterations already done in ``epoch``
    resumed: bool = field(default=False, compare=False)  # from a checkpoint of this run (what it logged counts)
    # The checkpoint resumed from, whose flags ``check_schedule`` compares with the run's once the epoch's
    # iterations are known.
    source: Opened | None = field(default=None, compare=False, repr=False)

    def steps_done(self, epoch: int) -> int:
        """Iterations of ``epoch`` already trained: this position's in its own epoch, else none."""
        return self.step if epoch == self.epoch else 0


def weights_only(ckpt: dict[str, Any]) -> bool:
    """Whether a --resume checkpoint holds weights only (no optimizer state or progress): training starts
    afresh from them, at --start_epoch."""
    return "optimizer" not in ckpt or "epoch" not in ckpt


def resume(state: TrainState, opened: Opened | None) -> Position:
    """Restore ``state`` from the ``--resume`` checkpoint ``opened``; returns where training goes on."""
    args, evaluating = state.args, getattr(state.args, "eval", False)
    start = Position(args.start_epoch)
    if opened is None:
        return start
    path, ckpt = opened.path, opened.ckpt
    saved = model_state(ckpt, path)
    check_kind(saved, state.model.state_dict(), path, evaluating)
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
    step = ckpt.get("step")
    _check_flags(opened.args, args, path, mid_epoch=step is not None)
    epoch = ckpt["epoch"] + 1 if step is None else ckpt["epoch"]  # after a complete epoch: the next one
    position = Position(epoch, step or 0, resumed=True, source=opened.flags_only())
    if step is None:
        keep_if_final(state, opened)
    _check_retention(opened.args, state, position)
    here = (position.epoch, position.step)
    # A --resume PATH that is not the folder's newest: --resume auto would go on from another one. (For
    # --resume auto itself, later checkpoints are those that did not load, reported as skipped already.)
    later = [p for p in list_checkpoints(args.output_dir) if progress(os.path.basename(p)) > here]
    if later and args.resume != "auto":
        log.warning(
            f"{args.output_dir} holds checkpoints beyond {path} ({os.path.basename(later[-1])}); "
            f"--resume auto would take those, not this run's"
        )
    log.info(f"resuming at epoch {position.epoch}, iteration {position.step}")
    return position


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


# The kinds of model state dict, told apart by their names: (what it holds, the command that writes it).
KINDS = {
    "mae": ("an MAE with decoder", "main_pretrain.py"),
    "probe": ("a linear probe", "main_linprobe.py"),
    "classifier": ("a fine-tuned classifier", "main_finetune.py"),
    "encoder": ("an encoder without decoder or head", ""),
}


def kind_of(state: dict[str, Any]) -> str:
    """The KINDS key of a model state dict: the probe's head is a BatchNorm then a linear layer."""
    if any(k.startswith("decoder_") for k in state):
        return "mae"
    return "probe" if "head.1.weight" in state else "classifier" if "head.weight" in state else "encoder"


def check_kind(saved: dict[str, Any], own: dict[str, Any], path: str, evaluating: bool = False) -> None:
    """A --resume checkpoint of another kind than the model is named as such, with the flag that takes
    it: a pre-training checkpoint given to --resume of a classifier is the usual slip, and listing its
    names against the model's would send the user to check --model and --input_size instead."""
    theirs, ours = kind_of(saved), kind_of(own)
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


def _check_flags(saved: argparse.Namespace | None, args: argparse.Namespace, path: str, mid_epoch: bool) -> None:
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


def _check_retention(saved: argparse.Namespace | None, state: TrainState, position: Position) -> None:
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
