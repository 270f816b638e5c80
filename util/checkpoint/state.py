"""Training checkpoints: what a run saves (``TrainState``) and where it stands (``Position``), saving them,
the check before a save, and pruning. Reading a checkpoint: opening.py; resume: resume.py; the checks of a
resumed run against its checkpoint: consistency.py.

Format: a dict with the official keys ``model``, ``optimizer``, ``epoch``, ``scaler``, ``args``, plus
``step`` (iterations done in ``epoch``; ``None`` once it is complete), ``rng`` (each rank's random
state, for exact resume) and entry-point ``extra`` state."""

import argparse
import errno
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import torch

from util.checkpoint.files import atomic_save, checkpoint_name, prune
from util.checkpoint.opening import Opened
from util.checkpoint.rng import gather_rng
from util.cli.errors import NonFiniteLoss, divergence_advice, fail
from util.cli.redact import args_without_secrets
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
        args = args_without_secrets(self.args)  # --finetune/--resume URL: the checkpoint may be shared
        return {**states, "args": args, "extra": self.extra, "log": self.log, "meters": self.meters}

    def load_state_dict(self, ckpt: dict[str, Any], path: str) -> None:
        """Restore what ``state_dict`` saved, except the model (``resume`` loads it strictly first,
        from any kind of checkpoint) and the args (this run's flags are the ones that count)."""
        # The state (moments, step counts) is the checkpoint's, each group's settings this run's flags: torch's
        # load_state_dict takes the saved groups' settings, so they are this run's before it loads (_with_settings).
        # The lr stays the checkpoint's: the schedule sets it at each step, and a run that saves again before its
        # first step (fine-tuning's last epoch, evaluated on resume) must save the lr that epoch ended with.
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in self.optimizer.param_groups]
        saved = _groups_in_order(ckpt["optimizer"], self.optimizer.param_groups)
        try:
            self.optimizer.load_state_dict(_with_settings(saved, settings))
        except (ValueError, KeyError) as e:
            fail(f"checkpoint {path}: its optimizer state does not fit this model and optimizer ({e})")
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.extra.update(ckpt.get("extra", {}))
        self.log, self.meters = ckpt.get("log"), ckpt.get("meters")  # log: None in checkpoints older than it


def _with_settings(saved: dict[str, Any], settings: list[dict[str, Any]]) -> dict[str, Any]:
    """The saved optimizer state with this optimizer's group settings in its groups (where they pair up), which
    torch's load then keeps. Loaded as saved, a --weight_decay or --layer_decay (lr_scale) given on resume was
    silently dropped while the args saved claimed it; and torch converts each loaded state tensor by the groups
    it loads: by the checkpoint's ``fused``, step counts saved by a non-fused AdamW (a CPU run's, the official
    code's) stayed CPU tensors in this run's fused AdamW, and a GPU run's first step refused them ('Expected
    all tensors to be on the same device'). With this run's settings they come as it keeps them (fused: float32
    on the parameter's device)."""
    groups = saved.get("param_groups") if isinstance(saved, dict) else None
    if not isinstance(groups, list) or len(groups) != len(settings) or not all(isinstance(g, dict) for g in groups):
        return saved  # torch's check names the misfit
    return {**saved, "param_groups": [{**group, **own} for group, own in zip(groups, settings, strict=True)]}


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
            f"cannot write checkpoint {path}: {e.strerror or e} (it needs about {tensor_bytes(obj) / 2**20:.0f} MiB, "
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


def tensor_bytes(obj: Any) -> int:
    """The bytes of the tensors in ``obj`` (nested dicts, lists and tuples): about a checkpoint's size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    children = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    return sum(map(tensor_bytes, children))


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
