"""Checkpoints: atomic writes, safe loading, exact resume, finding and pruning.

Format: a dict with the official keys ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``,
plus ``step`` (iterations done in ``epoch``; ``None`` once the epoch is complete), ``rng``
(each rank's random-number state, for exact resume) and entry-point ``extra`` state.
Files are named by the progress they hold: ``checkpoint-<epoch>.pth`` after a complete epoch,
``checkpoint-<epoch>-step<k>.pth`` inside one.
"""

import argparse
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from util import distributed
from util.errors import NonFiniteLoss, UserError, fail, lower_lr

# What the official checkpoints and ours pickle besides tensors and plain containers.
SAFE_GLOBALS = [argparse.Namespace]
_NAME = re.compile(r"^checkpoint-(\d+)(?:-step(\d+))?\.pth$")


# ---------------------------------------------------------------------------------------------
# Loading untrusted files
def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint (file or URL) without executing pickled code, or fail with one line."""
    if path.startswith(("https://", "http://")):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                return torch.hub.load_state_dict_from_url(path, map_location="cpu", weights_only=True)
        except Exception as e:  # network errors, refused pickles, damaged downloads
            fail(
                f"checkpoint {path} could not be downloaded or loaded ({type(e).__name__}: {str(e)[:160]}); "
                f"download it yourself and give the file"
            )
    if not os.path.isfile(path):
        fail(f"checkpoint {path} does not exist")
    if path.endswith(".safetensors") or _looks_like_safetensors(path):
        return load_safetensors(path)
    if not _looks_like_torch_file(path):
        fail(f"checkpoint {path} is truncated or not a PyTorch checkpoint; use an earlier checkpoint or write it again")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        fail(
            f"checkpoint {path} refused: it needs {refused.group(1) if refused else 'a Python object'} to load, "
            f"beyond the tensors and argparse.Namespace a checkpoint holds, and loading it could run code; "
            f"load only checkpoints you trust and re-save their state dict"
        )
    except Exception as e:  # torch reports damaged files with many exception types
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(
            f"checkpoint {path} is truncated or not a PyTorch checkpoint ({first[:160]}); "
            f"use an earlier checkpoint or write it again"
        )
    if not isinstance(ckpt, dict):
        fail(f"checkpoint {path} holds a {type(ckpt).__name__}, not a dict of states; it is not an MAE checkpoint")
    return ckpt


def load_safetensors(path: str) -> dict[str, Any]:
    """A .safetensors file as a checkpoint: ``{'model': tensors, 'args': Namespace or None}``.

    Weights only (no optimizer or progress): what ``export.py --to safetensors`` writes, or any
    state dict in the format. The args come back from the JSON that export stores as metadata.
    Nothing is unpickled. ``safetensors`` is imported here so that training does not need it.
    """
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError:
        fail(f"checkpoint {path} is a .safetensors file: pip install safetensors to read it")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path, device="cpu")
    except Exception as e:  # SafetensorError for damaged headers, OSError, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        fail(f"checkpoint {path} is truncated or not a safetensors file ({first[:160]}); write it again")
    args = None
    if "args" in metadata:
        try:
            args = argparse.Namespace(**json.loads(metadata["args"]))
        except (ValueError, TypeError) as e:
            fail(f"checkpoint {path}: its 'args' metadata is not a JSON object of flags ({e})")
    return {"model": state, "args": args}


def _looks_like_safetensors(path: str) -> bool:
    """8 bytes of header length (little endian), then the JSON header, which starts with '{'."""
    with open(path, "rb") as f:
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path)


def _looks_like_torch_file(path: str) -> bool:
    """A complete zip archive (torch >= 1.6) or a legacy pickle stream (it starts with PROTO)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return zipfile.is_zipfile(path) or head[:1] == b"\x80"


def saved_args(path: str) -> argparse.Namespace | None:
    """The flags a checkpoint was written with (None for official releases, which store none),
    read before the run builds anything. A zip checkpoint is memory-mapped, so its tensors are not
    read: a large checkpoint is loaded again, in full, where its weights are needed."""
    ckpt: Any = None
    if not path.startswith(("https://", "http://")) and os.path.isfile(path) and zipfile.is_zipfile(path):
        try:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # whatever it is, load_checkpoint says it in one line
            ckpt = None
    if ckpt is None:
        ckpt = load_checkpoint(path)
    args = ckpt.get("args") if isinstance(ckpt, dict) else None
    return args if isinstance(args, argparse.Namespace) else None


def model_state(ckpt: dict[str, Any], path: str) -> dict[str, torch.Tensor]:
    """The model's state dict in a checkpoint: under 'model' (official and ours) or at the top."""
    state = ckpt.get("model", ckpt)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        fail(f"checkpoint {path} has no model state dict (expected a 'model' entry of tensors)")
    return state


def load_model_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str) -> None:
    """Load a state dict whose names and shapes must equal the model's, or fail naming the difference."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        fail(
            f"checkpoint {path} does not fit {type(model).__name__}: {'; '.join(parts)}; check --model and --input_size"
        )
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Random-number state
def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this rank's device
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def _gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state, on every rank (so that rank 0 can save all of them)."""
    mine = capture_rng()
    if not distributed.is_dist():
        return [mine]
    states: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------------------
# Writing
def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"checkpoint-{epoch}.pth" if step is None else f"checkpoint-{epoch}-step{step}.pth"


def atomic_save(obj: Any, path: str) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename over ``path``.

    A crash at any moment leaves either the old file or the complete new one, never a partial one.
    A failed write raises the ``OSError`` that caused it (a full disk, a quota).
    """
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            writer = _KeepError(f)
            try:
                torch.save(obj, writer)
            except RuntimeError as e:
                # torch reports a failed write as "unexpected pos N vs M": raise the cause instead.
                if writer.error is None:
                    raise
                raise writer.error from e
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _KeepError:
    """A file's ``write`` that keeps the first ``OSError`` it raised (torch.save swallows it)."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


@dataclass
class TrainState:
    """What a training loop needs to save and restore besides the model weights."""

    model: torch.nn.Module  # the unwrapped model (no DDP, no compile wrapper)
    optimizer: torch.optim.Optimizer
    scaler: Any  # util.precision.LossScaler
    args: argparse.Namespace
    extra: dict[str, Any] = field(default_factory=dict)
    # log.txt's lines of the epochs done (None: resumed from a checkpoint older than this history,
    # whose log.txt is only appended to); the log is rewritten from it on resume.
    log: list[dict[str, Any]] | None = field(default_factory=list)
    # The running sums of the epoch's logged averages at a mid-epoch position (train_loop sets them
    # before a mid-epoch save), so that a resumed epoch logs the average of all its iterations.
    meters: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint entries this state owns (the official keys first); ``save_checkpoint``
        adds the position (``epoch``, ``step``) and every rank's random state."""
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "args": self.args,
            "extra": self.extra,
            "log": self.log,
            "meters": self.meters,
        }

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        """Restore what ``state_dict`` saved, except the model (``resume`` loads it strictly first,
        from any kind of checkpoint) and the args (this run's flags are the ones that count)."""
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            fail(f"checkpoint {path}: its optimizer state does not fit this model and optimizer ({e})")
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.extra.update(ckpt.get("extra", {}))
        self.log = ckpt.get("log")  # None in checkpoints older than the log history
        self.meters = ckpt.get("meters")


def save_checkpoint(state: TrainState, epoch: int, step: int | None = None) -> str | None:
    """Save on rank 0 (all ranks must call: the RNG states are gathered). Returns the path.

    Weights and optimizer state are checked first: a runaway last update must not be saved.
    """
    args = state.args
    name = checkpoint_name(epoch, step)
    check_finite(state, f"the end of epoch {epoch}" if step is None else f"epoch {epoch}, iteration {step}", name)
    rng = _gather_rng()
    if not distributed.is_main_process() or not args.output_dir:
        return None
    path = os.path.join(args.output_dir, name)
    obj = {**state.state_dict(), "epoch": epoch, "step": step, "rng": rng}
    if step is None:
        obj["meters"] = None  # an epoch's running sums belong to mid-epoch positions only
    try:
        atomic_save(obj, path)
    except OSError as e:
        free = shutil.disk_usage(args.output_dir).free
        fail(
            f"cannot write checkpoint {path}: {e.strerror or e} (it needs about {_tensor_bytes(obj) / 2**20:.0f} MiB, "
            f"{free / 2**20:.0f} MiB are free there); the earlier checkpoints are intact: free space (or choose "
            f"another --output_dir) and continue with --resume auto"
        )
    keep_last, keep_every = getattr(args, "keep_last", 0), getattr(args, "save_freq", 1)
    prune(args.output_dir, keep_last, keep_every, getattr(args, "epochs", 0) - 1, just_written=path)
    return path


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def check_finite(state: TrainState, where: str, name: str) -> None:
    """Stop (on every rank) unless the weights, buffers and optimizer state are finite.

    Losses are checked before each update; this checks the updates themselves, once per save.
    One fused norm per device and dtype: a norm is NaN or inf if an element is, and inf in float32
    for values past ~1e19 too, which the next forward pass would overflow anyway (runaway weights).
    """
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
    if distributed.any_rank(not finite, getattr(state.args, "device", "cpu")):
        raise NonFiniteLoss(
            f"weights or optimizer state are not finite at {where} (a runaway update); stopping without "
            f"saving {name}, so the last checkpoint stays intact. Lower {lower_lr(state.args)}, or try "
            f"--precision bf16/fp32"
        )


# ---------------------------------------------------------------------------------------------
# Finding, resuming, pruning
def _progress(name: str) -> tuple[int, int] | None:
    """Sort key: (epoch, iterations done) of the position a checkpoint resumes at."""
    m = _NAME.match(name)
    if not m:
        return None
    epoch, step = int(m.group(1)), m.group(2)
    return (epoch + 1, 0) if step is None else (epoch, int(step))


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint paths in ``output_dir``, oldest progress first."""
    if not os.path.isdir(output_dir):
        return []
    named = [(p, n) for n in os.listdir(output_dir) if (p := _progress(n)) is not None]
    return [os.path.join(output_dir, n) for _, n in sorted(named)]


def find_resumable(output_dir: str) -> tuple[str, dict[str, Any]] | None:
    """The newest checkpoint in ``output_dir`` that loads; a broken newer one is reported and skipped."""
    for path in reversed(list_checkpoints(output_dir)):
        try:
            return path, load_checkpoint(path)
        except UserError as e:
            print(f"warning: skipping {path}: {e}")
    return None


@dataclass
class Position:
    epoch: int
    step: int = 0  # iterations already done in ``epoch``


def resume(state: TrainState) -> Position:
    """Restore from ``args.resume`` (a path, or 'auto'); returns where training goes on."""
    args = state.args
    start = Position(args.start_epoch)
    if not args.resume:
        return start
    if args.resume == "auto":
        found = find_resumable(args.output_dir)
        if found is None:
            print(f"--resume auto: no checkpoint in {args.output_dir}, starting from scratch")
            return start
        path, ckpt = found
    else:
        path, ckpt = args.resume, load_checkpoint(args.resume)
    load_model_strict(state.model, model_state(ckpt, path), path)
    print(f"resumed model from {path}")
    if "optimizer" not in ckpt or "epoch" not in ckpt or getattr(args, "eval", False):
        # Weights only (an official release, a .safetensors file, or --eval): train from --start_epoch.
        if not getattr(args, "eval", False):
            print(
                f"warning: {path} holds weights only (no optimizer state or progress): training starts "
                f"from them at epoch {start.epoch}; this is not an exact resume"
            )
        return start
    state.load_state_dict(ckpt, path)
    rng = ckpt.get("rng")
    if rng and len(rng) == distributed.world_size():
        restore_rng(rng[distributed.rank()])
    elif rng:
        print(
            f"warning: {path} was written by {len(rng)} processes, this run has "
            f"{distributed.world_size()}: random state is not restored, so resume is not exact"
        )
    _warn_changed_meaning(ckpt.get("args"), args, path)
    step = ckpt.get("step")
    if step is not None:
        _check_same_batches(ckpt.get("args"), args, path)
    position = Position(ckpt["epoch"] + 1) if step is None else Position(ckpt["epoch"], step)
    later = [p for p in list_checkpoints(args.output_dir) if _progress(os.path.basename(p)) > _progress_of(position)]
    if later:
        print(
            f"warning: {args.output_dir} holds checkpoints beyond {path} ({os.path.basename(later[-1])}); "
            f"--resume auto would take those, not this run's"
        )
    print(f"resuming at epoch {position.epoch}, iteration {position.step}")
    return position


def _progress_of(position: "Position") -> tuple[int, int]:
    return (position.epoch, position.step)


# Flags that change what the model learns. A run resumed with another value goes on training
# something else than it started (--model and --input_size mostly cannot load: the weights differ).
MEANING_FLAGS = ("model", "input_size", "mask_ratio", "norm_pix_loss", "global_pool", "nb_classes", "smoothing")


def _warn_changed_meaning(saved: Any, args: argparse.Namespace, path: str) -> None:
    if not isinstance(saved, argparse.Namespace):
        return
    changed = [
        f"--{flag} {getattr(saved, flag)} -> {getattr(args, flag)}"
        for flag in MEANING_FLAGS
        if hasattr(saved, flag) and hasattr(args, flag) and getattr(saved, flag) != getattr(args, flag)
    ]
    if changed:
        print(
            f"warning: {path} was trained with other flags ({', '.join(changed)}); training goes on with the new ones"
        )


def _check_same_batches(saved: Any, args: argparse.Namespace, path: str) -> None:
    """A mid-epoch position counts iterations: it means the same samples only with the same
    batch size, process count and accumulation."""
    if not isinstance(saved, argparse.Namespace):
        return
    for flag in ("batch_size", "world_size", "accum_iter"):
        then, now = getattr(saved, flag, None), getattr(args, flag, None)
        if then is not None and now is not None and then != now:
            name = "number of processes" if flag == "world_size" else f"--{flag}"
            fail(
                f"checkpoint {path} was written inside an epoch with {name} {then}, this run has {now}; "
                f"resume with the same settings, or from an epoch-end checkpoint"
            )


def prune(
    output_dir: str, keep_last: int, keep_every: int, final_epoch: int, just_written: str | None = None
) -> list[str]:
    """Delete old checkpoints; returns the removed paths.

    Kept: the newest checkpoint and ``just_written``; among complete epochs, the ``keep_last``
    newest, every epoch ``e`` with ``e % keep_every == 0`` and the final epoch. Older mid-epoch
    checkpoints go.
    """
    _remove_stale_temporaries(output_dir)
    if keep_last <= 0:
        return []  # keep everything
    paths = list_checkpoints(output_dir)
    complete = [p for p in paths if _NAME.match(os.path.basename(p)).group(2) is None]
    newest = set(complete[-keep_last:])
    removed = []
    for path in paths[:-1]:  # the newest checkpoint always stays
        if just_written and os.path.samefile(path, just_written):
            continue
        m = _NAME.match(os.path.basename(path))
        epoch, mid_epoch = int(m.group(1)), m.group(2) is not None
        permanent = epoch % keep_every == 0 or epoch == final_epoch
        if not mid_epoch and (path in newest or permanent):
            continue
        os.remove(path)
        removed.append(path)
    return removed


def _remove_stale_temporaries(output_dir: str) -> None:
    """Temporary files of writes that a killed process never finished (ours are renamed)."""
    for name in os.listdir(output_dir):
        if _NAME.match(name.split(".tmp")[0]) and ".pth.tmp" in name and not name.endswith(f".tmp{os.getpid()}"):
            os.remove(os.path.join(output_dir, name))
