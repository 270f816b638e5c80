"""A fault campaign against pre-training, fine-tuning or linear probing (``--entry``): kill -9 at
random moments (in training, inside checkpoint writes, between a checkpoint's write and its rename,
after the rename, while pruning, while log.txt is written), a full disk under every writer, Ctrl-C
once and twice, damaged checkpoints; each trial resumed with ``--resume auto`` until it finishes,
checking what docs/what-survives-what.md promises:

- after every fault, every ``checkpoint-*.pth`` in the folder loads (but those damaged on purpose,
  which must not), and log.txt has no epoch twice; a run that ends by itself (a full disk, Ctrl-C)
  leaves no temporary file and says why in one line, never a traceback;
- in the end the final checkpoint and checkpoint-0.pth (which --save_freq keeps) equal an
  uninterrupted run's bitwise (weights, optimizer, random state, log history, best top-1), log.txt
  equals its log.txt (each epoch once, the same losses), no temporary file is left, and (where the
  uninterrupted run has the trials' flags: all but pre-training's reference) the same checkpoints
  are left.

The kinds of fault (FAULTS):

- a SITES name: the run kills itself (SIGKILL) at the n-th occurrence of that point;
- timer: the driver kills the run after a random delay;
- damage, bit-flip: the newest checkpoint loses its tail, or one bit inside a tensor (a damaged
  disk); it must then fail to load, and ``--resume auto`` must report it and fall back;
- full-disk: the n-th write of one writer (WRITERS, in turn: the checkpoint, log.txt's rewrite or append,
  TensorBoard's events, the reconstruction picture) fails with ENOSPC after part of its bytes. A
  checkpoint or log.txt ends the run with one ``error:`` line (exit 2); TensorBoard and the
  picture are one warning, and the run finishes. Trials drawing the last two write them (``--vis_freq
  1``, ``--log_dir``: the entry's optional_flags), which the other trials leave off;
- ctrl-c: the driver sends SIGINT after a random delay: a checkpoint at the next check point, exit 130;
- ctrl-c-twice: the run sends itself SIGINT after its n-th optimizer step and again part-way
  through the checkpoint that the first one asked for: it stops at once, exit 130;
- accum-remainder: not a fault but the trial's flags: ``--accum_iter 4`` on 6 iterations an epoch,
  so that each epoch ends with a shorter accumulation group. Such trials are compared with an
  uninterrupted run of the same flags, forked by the driver (in the work folder) when first needed.

    python tests/fault_campaign.py --trials 60 --seed 11 --faults 5   # by hand; test_fault_campaign runs a few
    python tests/fault_campaign.py --entry finetune --trials 30 --seed 11 --faults 5

One driver process (test_fault_campaign's is pytest's) imports torch once and forks every run,
which then runs the entry point (ENTRIES) as the command line does. Runs are single-threaded, as
bitwise comparisons need. Pre-training runs are compared with helpers.Reference, an uninterrupted run
on the command line (the test session's ``pretrain_reference``, which test_resilience and
test_pretrain share); ``--reference`` reuses one that a campaign or a test session left. Fine-tuning
and linear probing start from that run's final checkpoint (``--finetune``: the encoder's loading
and its flags are part of every fresh start; a resume does not read it) on a train/val split of
the same demo images, and are compared with an uninterrupted run of their own flags, forked by the
driver. They add a kill site (``eval``: an epoch's evaluation done, neither logged nor in a
checkpoint) and have no reconstruction picture: each entry declares the faults it skips.
"""

import argparse
import builtins
import errno
import inspect
import io
import json
import os
import random
import shutil
import signal
import struct
import sys
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # (test_fault_campaign imports it and sets the threads itself)
    os.environ["OMP_NUM_THREADS"] = "1"  # before torch: the same float sums in every run
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from helpers import RESUMABLE_EPOCHS as EPOCHS  # noqa: E402
from helpers import (  # noqa: E402
    RESUMABLE_SCHEDULE,
    TINY,
    Reference,
    assert_same,
    budgeted_open,
    counting_step,
    make_split,
    resumable_flags,
    run_forked,
)

import engine_finetune  # noqa: E402
import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
from util.checkpoint import files as checkpoint_files  # noqa: E402  (listing only)
from util.checkpoint import load as safe_load  # noqa: E402
from util.cli.errors import UserError, run_cli  # noqa: E402
from util.lars import LARS  # noqa: E402

# The reference's flags (helpers.resumable_flags): 6 iterations an epoch; checkpoints after iterations 2
# and 4 and at the end.
# Where a run kills itself, and the largest occurrence drawn: small enough that a run resumed
# late mostly still gets there (earlier faults moved the trial along).
SITES = {
    "step": 9,  # right after an optimizer step: training
    "ckpt-write": 4,  # a checkpoint's temporary file partly written
    "ckpt-before-rename": 4,  # complete and flushed, not renamed
    "ckpt-after-rename": 4,  # renamed; not pruned, epoch line not in log.txt
    "prune": 3,  # while old checkpoints are removed
    "log-rewrite": 1,  # log.txt's temporary written at start, not renamed
    "log-append": 2,  # before an epoch's line is appended, after its checkpoint
    "eval": 3,  # fine-tuning, probing: an epoch's evaluation done, not logged (its checkpoint came before)
}
# The writers a full disk is tried on: what their temporary (or event) file's name holds, and the
# largest occurrence drawn. A run writes 9 checkpoints (fine-tuning and probing 10: the last epoch's
# again after its evaluation), log.txt once at start (a rewrite from the checkpoint's history, on a
# fresh start or after a drift) and once an epoch (an append), TensorBoard's events at start and
# once an epoch, a picture an epoch (pre-training).
WRITERS = {"checkpoint": (".pth.tmp", 4), "log-rewrite": ("log.txt.tmp", 1), "log-append": ("log.txt.tmp", 3)}
WRITERS |= {"tensorboard": ("tfevents", 3), "picture": (".png.tmp", 3)}
OPTIONAL_WRITERS = ("tensorboard", "picture")  # a warning, and the run goes on
FAULTS = [*SITES, "timer", "damage", "bit-flip", "full-disk", "ctrl-c", "ctrl-c-twice", "accum-remainder"]
ACCUM_ITER = 4  # 6 iterations an epoch: groups of 4 and 2; a checkpoint after iteration 4 and at the end
FIRED = "campaign: fired "  # what a run prints when a fault that does not end it by itself fires
# The checkpoints a trial ends with (--keep_last 1, --save_freq 20), compared with the uninterrupted
# run's: the final one and epoch 0's (a classifier's holds the epoch before its evaluation).
COMPARED = ("checkpoint-0.pth", f"checkpoint-{EPOCHS - 1}.pth")


@dataclass(frozen=True)
class Entry:
    """An entry point under faults: what differs between them, the rest of the campaign is shared."""

    name: str
    module: Any  # main_pretrain, main_finetune or main_linprobe: get_args_parser and main
    # Its flags for an output folder (the third), from the pre-training reference run and the work folder.
    flags: Callable[[Reference, Path, Path], list[str]]
    optimizer: type[torch.optim.Optimizer]  # whose steps the 'step' and 'ctrl-c-twice' faults count
    optional_flags: Callable[[Path], list[str]]  # what turns its optional writers on, in an output folder
    # Fault kinds, SITES and WRITERS it has no moment for: declared, so that none is left out by accident.
    skipped: tuple[str, ...]
    # Its uninterrupted run of the base flags is helpers.Reference's (else forked, as for --accum_iter).
    shares_reference: bool = False

    @property
    def kinds(self) -> list[str]:
        return [f for f in FAULTS if f not in self.skipped]

    @property
    def writers(self) -> list[str]:
        return [w for w in WRITERS if w not in self.skipped]


def _classifier_flags(reference: Reference, workdir: Path, out: Path, *extra: str) -> list[str]:
    """Fine-tuning's or probing's flags: the mini classifier from the reference's MAE checkpoint, 6
    iterations an epoch on 48 training images (the demo's, as the reference's) and 18 to evaluate,
    and the reference's schedule and check points."""
    data = workdir / "split"
    if not data.exists():  # made by the first run's flags, in the driver
        make_split(data, train=16, val=6)
    mae = reference.out / f"checkpoint-{EPOCHS - 1}.pth"
    flags = [*TINY, "--model", "vit_mini_patch4", "--batch_size", "8", "--nb_classes", "3", *RESUMABLE_SCHEDULE]
    return [*flags, "--finetune", str(mae), "--data_path", str(data), "--output_dir", str(out), "--log_dir", "", *extra]


def _tensorboard(out: Path) -> list[str]:
    return ["--log_dir", str(out / "tensorboard")]


ENTRIES = {
    "pretrain": Entry(
        "pretrain",
        main_pretrain,
        lambda reference, _, out: resumable_flags(reference.data, out),
        torch.optim.AdamW,
        lambda out: ["--vis_freq", "1", *_tensorboard(out)],
        skipped=("eval",),  # nothing is evaluated (the k-NN monitor is off)
        shares_reference=True,
    ),
    "finetune": Entry(
        "finetune",
        main_finetune,
        # mixup and cutmix draw from the main process's numpy stream each step (the random state a
        # checkpoint must carry), besides RandAugment, random erasing, drop path and label smoothing
        # of the defaults; a blr at which the best top-1 moves.
        lambda reference, workdir, out: _classifier_flags(
            reference, workdir, out, "--mixup", "0.8", "--cutmix", "1.0", "--blr", "5e-2", "--dist_eval"
        ),
        torch.optim.AdamW,
        _tensorboard,
        skipped=("picture",),  # a classifier draws no reconstructions
    ),
    "linprobe": Entry(
        "linprobe",
        main_linprobe,
        _classifier_flags,
        LARS,
        _tensorboard,
        skipped=("picture",),
    ),
}


# ---------------------------------------------------------------------------------------------
# In the forked run
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _say(label: str) -> None:
    """Tell the driver that a fault fired (on stderr, which the run's log collects)."""
    sys.stderr.write(f"{FIRED}{label}\n")
    sys.stderr.flush()


def _arm(entry: Entry, fault: str, n: int, cut: int) -> None:
    """Make this run meet ``fault`` at the ``n``-th occurrence of its moment (``cut``: the bytes a
    checkpoint gets before its write fails)."""
    if fault in SITES:
        _arm_kill(entry, fault, n, cut)
    elif fault.startswith("full-disk:"):
        _arm_full_disk(fault.split(":", 1)[1], n, cut)
    elif fault == "ctrl-c-twice":
        _arm_ctrl_c_twice(entry, n, cut)


def _after_optimizer_steps(entry: Entry, call: Callable[[int], object]) -> None:
    """``call(k)`` after the k-th optimizer step of this run."""
    entry.optimizer.step = counting_step(lambda _, k: call(k), entry.optimizer)


def _arm_kill(entry: Entry, site: str, n: int, cut: int) -> None:
    """Kill this process at the ``n``-th occurrence of ``site`` (``cut``: the bytes of a checkpoint
    written before a 'ckpt-write' kill)."""
    seen = [0]

    def hit(here: str) -> bool:
        if here == site:
            seen[0] += 1
            return seen[0] == n
        return False

    _after_optimizer_steps(entry, lambda k: hit("step") and _die())

    evaluate = engine_finetune.evaluate  # the classifiers' epoch loop calls it through the module

    def evaluated(*args, **kwargs):
        stats = evaluate(*args, **kwargs)
        if hit("eval"):
            _die()
        return stats

    engine_finetune.evaluate = evaluated

    # A checkpoint's temporary file whose writer dies once it has written ``cut`` bytes; log.txt's
    # temporary file, written to add an epoch's line after the epoch's checkpoint (atomic_append).
    # Through ``open`` itself, which every writer calls: this process is the forked run's alone.
    def armed(path: str, mode: str) -> bool:
        if "log.txt.tmp" in path and "w" in mode and hit("log-append"):
            _die()
        return ".pth.tmp" in path and "w" in mode and hit("ckpt-write")

    builtins.open = budgeted_open(cut, _die, armed)

    real_replace, real_remove = os.replace, os.remove

    def replace(src, dst):
        if str(dst).endswith(".pth") and hit("ckpt-before-rename"):
            _die()
        if str(dst).endswith("log.txt") and hit("log-rewrite"):
            _die()
        real_replace(src, dst)
        if str(dst).endswith(".pth") and hit("ckpt-after-rename"):
            _die()

    def remove(path):
        if str(path).endswith(".pth") and hit("prune"):
            _die()
        real_remove(path)

    os.replace, os.remove = replace, remove


def _arm_full_disk(writer: str, n: int, cut: int) -> None:
    """The ``n``-th file ``writer`` opens for writing takes ``cut`` bytes (a checkpoint) or none
    (the small files), then its write raises ENOSPC, as a full disk does."""
    marker, seen = WRITERS[writer][0], [0]

    def armed(path: str, mode: str) -> bool:
        if marker in path and ("w" in mode or "a" in mode) and (marker != "log.txt.tmp" or _log_write() == writer):
            seen[0] += 1
            return seen[0] == n
        return False

    def full() -> None:
        _say(f"full-disk:{writer}")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # TensorBoard writes its events through io.open (the same function as builtins.open).
    builtins.open = io.open = budgeted_open(cut if writer == "checkpoint" else 0, full, armed)


def _log_write() -> str:
    """Whether log.txt is being appended to or rewritten from the checkpoint's history (at start)."""
    appending = any(frame.function == "atomic_append" for frame in inspect.stack(0))
    return "log-append" if appending else "log-rewrite"


def _arm_ctrl_c_twice(entry: Entry, n: int, cut: int) -> None:
    """Ctrl-C after the ``n``-th optimizer step, and again once the checkpoint that the first one
    asked for has ``cut`` bytes written: the second must stop the run at once, mid-write."""
    first_sent = [False]

    def first(k: int) -> None:
        if k == n:
            first_sent[0] = True
            os.kill(os.getpid(), signal.SIGINT)

    def second() -> None:
        _say("ctrl-c-twice")
        os.kill(os.getpid(), signal.SIGINT)  # its handler raises KeyboardInterrupt right here

    _after_optimizer_steps(entry, first)
    builtins.open = budgeted_open(cut, second, lambda path, mode: first_sent[0] and ".pth.tmp" in path and "w" in mode)


def _run(entry: Entry, argv: list[str], log: Path, fault: str | None = None, n: int = 0, cut: int = 0) -> int:
    """Fork a run of the entry point with ``argv``, its output appended to ``log``; returns its pid."""

    def run() -> None:
        if fault:
            _arm(entry, fault, n, cut)
        run_cli(lambda: entry.module.main(entry.module.get_args_parser().parse_args(argv)))

    return run_forked(log, run, append=True)


def _wait(pid: int, after: float | None = None, sig: int = signal.SIGKILL) -> int:
    """Wait for the run (send it ``sig`` once, after ``after`` seconds); its exit code, or -signal."""
    begin = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if after is not None else 0)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() - begin > after:
            os.kill(pid, sig)
            after = None
        time.sleep(0.005)


# ---------------------------------------------------------------------------------------------
# In the driver
def _log_lines(out: Path) -> list[dict[str, Any]]:
    path = out / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _check_after_fault(out: Path, damaged: dict[str, tuple[int, int]]) -> list[str]:
    """Every checkpoint loads (but those damaged on purpose); no epoch twice in log.txt."""
    problems = []
    for path in out.glob("checkpoint-*.pth"):
        if _is_damaged(str(path), damaged):
            continue
        try:
            safe_load.load_checkpoint(str(path))
        except UserError as e:
            problems.append(f"{path.name} does not load: {e}")
    try:
        epochs = [line["epoch"] for line in _log_lines(out)]
        if epochs != sorted(set(epochs)):
            problems.append(f"log.txt epochs {epochs}")
    except (ValueError, KeyError) as e:
        problems.append(f"log.txt unreadable: {e}")
    return problems


def _temporaries(out: Path, pid: int | None = None) -> list[str]:
    """Temporary files under ``out`` (those of process ``pid`` only, when given)."""
    pattern = f"*.tmp{pid}" if pid else "*.tmp*"
    return sorted(str(p.relative_to(out)) for p in out.rglob(pattern))


def _damage(path: str, fault: str, rng: random.Random) -> str:
    """Damage a checkpoint as a bad disk would; returns what was done."""
    if fault == "damage":
        blob = Path(path).read_bytes()
        keep = rng.randrange(len(blob))
        Path(path).write_bytes(blob[:keep])
        return f"cut to {keep} of {len(blob)} bytes"
    return _flip_tensor_bit(path, rng)


def _flip_tensor_bit(path: str, rng: random.Random) -> str:
    """Flip one bit of a tensor's bytes (a storage record of torch's zip, stored uncompressed)."""
    with zipfile.ZipFile(path) as archive:
        member = rng.choice([m for m in archive.infolist() if "/data/" in m.filename and m.file_size])
    with open(path, "r+b") as f:
        f.seek(member.header_offset + 26)  # a local file header: 30 bytes, then its name and extra field
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        where = member.header_offset + 30 + name_length + extra_length + rng.randrange(member.file_size)
        f.seek(where)
        byte = f.read(1)[0] ^ (1 << rng.randrange(8))
        f.seek(where)
        f.write(bytes([byte]))
    return f"bit flipped at byte {where} (in {member.filename})"


def _comparable(path: Path) -> dict[str, Any]:
    """A checkpoint, without the flags that only say where, which extras are written and which
    checkpoints are kept (the pre-training reference keeps all of them, for test_pretrain)."""
    ckpt = safe_load.load_checkpoint(str(path))
    extras = ("output_dir", "log_dir", "vis_freq", "keep_last")
    ckpt["args"] = {k: v for k, v in vars(ckpt["args"]).items() if k not in extras}
    return ckpt


def _when(fault: str) -> int:
    """A trial's faults in this order: a rewrite of log.txt happens on a fresh start (or after a
    drift), damage needs a checkpoint, a full disk under an optional writer lets the run finish."""
    if fault == "log-rewrite":
        return 0
    if fault in ("damage", "bit-flip", "full-disk:log-rewrite"):
        return 2
    if fault.split(":")[-1] in OPTIONAL_WRITERS:
        return 3
    return 1


@dataclass(frozen=True)
class Variant:
    """A trial's flags beyond the entry's."""

    accumulation: bool  # --accum_iter with a remainder
    optional: bool  # the optional writers: TensorBoard (and pre-training's picture) every epoch

    @classmethod
    def of(cls, faults: list[str]) -> "Variant":
        optional = {f"full-disk:{w}" for w in OPTIONAL_WRITERS}
        return cls("accum-remainder" in faults, bool(optional & set(faults)))

    def flags(self, entry: Entry, reference: Reference, workdir: Path, out: Path) -> list[str]:
        flags = entry.flags(reference, workdir, out)
        if self.accumulation:
            # Checkpoints sit on optimizer steps: --ckpt_every_steps must be a multiple of --accum_iter.
            flags += ["--accum_iter", str(ACCUM_ITER), "--ckpt_every_steps", str(ACCUM_ITER)]
        if self.optional:
            flags += entry.optional_flags(out)
        return flags


@dataclass(frozen=True)
class Expected:
    """An uninterrupted run's COMPARED checkpoints, log.txt, and the checkpoint
    names it leaves (None for helpers.Reference's, which keeps every checkpoint)."""

    checkpoints: dict[str, dict[str, Any]]
    log: list[dict[str, Any]]
    names: list[str] | None


class Expectations:
    """What a trial must end with, for each set of flags that changes training (the entry's;
    ``--accum_iter``): pre-training's of the entry's flags is the reference; the others are forked
    by the driver when first needed."""

    def __init__(self, entry: Entry, reference: Reference, workdir: Path):
        self.entry, self.reference, self.workdir = entry, reference, workdir
        self.known: dict[bool, Expected] = {}
        self.seconds = reference.seconds  # the base run's training time (a forked one's once it ran)

    def folder(self, accumulation: bool) -> Path:
        if self.entry.shares_reference and not accumulation:
            return self.reference.out
        return self.workdir / f"reference-{self.entry.name}{'-accum' if accumulation else ''}"

    def of(self, variant: Variant) -> Expected:
        key = variant.accumulation
        if key not in self.known:
            out = self.folder(key)
            names = None
            if out != self.reference.out:
                log, begin = out.with_suffix(".log"), time.time()
                _clear(out, log)  # an earlier campaign's in this work folder would only be resumed
                flags = Variant(key, False).flags(self.entry, self.reference, self.workdir, out)
                code = _wait(_run(self.entry, flags, log))
                if code != 0:
                    raise RuntimeError(f"the uninterrupted run {out.name} failed ({code}): {log.read_text()[-2000:]}")
                if not key:
                    self.seconds = round(time.time() - begin, 2)
                names = _checkpoint_names(out)
            checkpoints = {name: _comparable(out / name) for name in COMPARED}
            self.known[key] = Expected(checkpoints, _log_lines(out), names)
        return self.known[key]


def _clear(out: Path, log: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    log.unlink(missing_ok=True)


def _checkpoint_names(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*.pth"))


def _judge(fault: str, code: int, output: str) -> tuple[str | None, list[str]]:
    """What a run that met ``fault`` did: the fault that fired (None if the run never got there)
    and what it did wrong."""
    fired = [line[len(FIRED) :] for line in output.splitlines() if line.startswith(FIRED)]
    label = fired[-1] if fired else None
    problems = ["a traceback"] if "Traceback (most recent call last)" in output else []
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith(FIRED)]
    last = lines[-1] if lines else ""
    if code == -signal.SIGKILL and (fault in SITES or fault == "timer"):
        return fault, problems
    if code == 128 + signal.SIGINT and fault == "ctrl-c":
        return fault, problems + _expect(last, "stopped", "a line saying it stopped")
    if code == 128 + signal.SIGINT and fault == "ctrl-c-twice":
        if label:  # the second Ctrl-C: at once, inside the checkpoint's write
            return label, problems + _expect(last, "stopped at once by Ctrl-C", "the stop at once")
        # The second came too late: the checkpoint that the first asked for was shorter than ``cut``.
        problems += _expect(last, "stopped on request after writing", "the stop after a checkpoint")
        return f"{fault}:first-only", problems
    if code == 2 and label and label.split(":")[-1] not in OPTIONAL_WRITERS:
        return label, problems + _expect(last, "No space left on device", "one error line") + (
            [] if last.startswith("error: ") else [f"last line not an error: {last!r}"]
        )
    if code == 0 and label in {f"full-disk:{w}" for w in OPTIONAL_WRITERS}:
        warned = [line for line in lines if "cannot write" in line and "No space left on device" in line]
        return label, problems + ([] if warned else ["no warning of the failed write"])
    if code == 0 and not label:
        return None, problems
    return label or fault, [*problems, f"exit {code}, last line {last!r}"]


def _expect(line: str, text: str, what: str) -> list[str]:
    return [] if text in line else [f"{what} expected, last line: {line!r}"]


def _skipped_as_expected(newest_damaged: str | None, code: int, output: str) -> list[str]:
    """A damaged newest checkpoint must be reported and skipped by the run that resumes."""
    resumed = code == 0 or "start training" in output
    if newest_damaged and resumed and f"skipping {newest_damaged}" not in output:
        return [f"{Path(newest_damaged).name} (damaged) not reported as skipped"]
    return []


def _is_damaged(path: str, damaged: dict[str, tuple[int, int]]) -> bool:
    """Whether ``path`` is still the file damaged on purpose (not written again since)."""
    st = os.stat(path)
    return damaged.get(path) == (st.st_size, st.st_mtime_ns)


def _newest_damaged(out: Path, damaged: dict[str, tuple[int, int]]) -> str | None:
    paths = checkpoint_files.list_checkpoints(str(out))
    return paths[-1] if paths and _is_damaged(paths[-1], damaged) else None


def _drop_last_log_line(out: Path) -> None:
    """Leave log.txt as a kill right after a checkpoint's rename does (without the checkpoint's
    epoch line), so that the next run rewrites it from the checkpoint's history: on a fresh start
    that rewrite has no bytes, and an empty write cannot meet a full disk."""
    path = out / "log.txt"
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    if lines:
        path.write_text("".join(lines[:-1]))


def _draw_order(rng: random.Random, count: int, kinds: list[str], writers: list[str]) -> list[str]:
    """``count`` faults: every kind in turn (in a shuffled order), so that a few trials cover them
    all; the ``writers`` of the full disks in turn too."""
    order = [f for _ in range(count // len(kinds) + 1) for f in rng.sample(kinds, len(kinds))][:count]
    writers = [w for _ in range(count // len(writers) + 1) for w in rng.sample(writers, len(writers))]
    return [f"full-disk:{writers.pop()}" if f == "full-disk" else f for f in order]


def campaign(
    trials: int,
    seed: int,
    faults_per_trial: int,
    workdir: Path,
    reference: Reference | None = None,
    kinds: list[str] | None = None,
    progress: Path | None = None,
    entry: str = "pretrain",
) -> dict[str, Any]:
    """Run ``trials`` trials of ``entry`` (ENTRIES) with ``faults_per_trial`` faults each, drawn in
    turn from ``kinds`` (all of the entry's by default); returns the figures and the failures, which
    go to ``progress`` (a JSON file) after every trial too: a long campaign can be read while it runs."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    begin = time.time()
    runner = ENTRIES[entry]
    reference = reference or Reference.make(workdir)
    expectations = Expectations(runner, reference, workdir)
    expectations.of(Variant(False, False))  # a forked uninterrupted run times the timer faults' delays
    ref_seconds = expectations.seconds
    size = (expectations.folder(False) / COMPARED[-1]).stat().st_size

    order = _draw_order(rng, trials * faults_per_trial, kinds or runner.kinds, runner.writers)
    drawn = Counter(f.split(":")[0] for f in order)
    fired: Counter[str] = Counter()
    trials_with: Counter[str] = Counter()
    failures, runs = [], 0

    def figures(done_trials: int) -> dict[str, Any]:
        return {
            "entry": entry,
            "trials": done_trials,
            "seed": seed,
            "faults_per_trial": faults_per_trial,
            "runs": runs,
            "drawn": {f: drawn[f] for f in runner.kinds},
            "faults": dict(sorted(fired.items())),
            "trials_with": dict(sorted(trials_with.items())),
            "failures": failures,
            "seconds": round(time.time() - begin, 1),
        }

    for trial in range(trials):
        out, log = workdir / f"trial{trial}", workdir / f"trial{trial}.log"
        _clear(out, log)  # a trial left by an earlier campaign in this work folder would pass by resuming
        faults = sorted(order[trial * faults_per_trial : (trial + 1) * faults_per_trial], key=_when)
        variant = Variant.of(faults)
        name = f"trial {trial} ({', '.join(faults)})"
        damaged: dict[str, tuple[int, int]] = {}
        done, met = False, Counter()
        for fault in [*faults, None]:
            if fault == "accum-remainder":
                met[fault] += 1
                continue
            if fault in ("damage", "bit-flip"):
                # The newest one not damaged yet: two damages in a row make the run fall back twice.
                intact = [p for p in checkpoint_files.list_checkpoints(str(out)) if not _is_damaged(p, damaged)]
                if intact:
                    how = _damage(intact[-1], fault, rng)
                    st = os.stat(intact[-1])
                    damaged[intact[-1]] = (st.st_size, st.st_mtime_ns)
                    met[fault] += 1
                    if _loads(intact[-1]):
                        failures.append(f"{name}: {Path(intact[-1]).name} loads after its damage ({how})")
                continue
            n = rng.randint(1, _largest(fault, variant)) if fault else 0
            cut = rng.randrange(size)
            with open(log, "a") as f:
                f.write(f"=== trial {trial}: fault {fault} {n}\n")
            start = log.stat().st_size
            expect_skip = _newest_damaged(out, damaged)
            if fault == "full-disk:log-rewrite":
                _drop_last_log_line(out)
            armed = fault if fault not in ("timer", "ctrl-c") else None
            pid = _run(runner, variant.flags(runner, reference, workdir, out), log, armed, n, cut)
            delay = rng.uniform(0.05, ref_seconds / 2) if fault in ("timer", "ctrl-c") else None
            code = _wait(pid, delay, signal.SIGINT if fault == "ctrl-c" else signal.SIGKILL)
            runs += 1
            output = log.read_text()[start:]
            label, problems = _judge(fault or "", code, output)
            problems += _skipped_as_expected(expect_skip, code, output)
            if label and fault:
                met[label] += 1
            if code not in (0, -signal.SIGKILL):  # ended by itself: nothing half-written left
                problems += [f"temporary file left: {t}" for t in _temporaries(out, pid)]
            if code != 0:
                problems += _check_after_fault(out, damaged)
            failures += [f"{name}, after {fault} {n}: {p}" for p in problems]
            if problems and code not in (0, -signal.SIGKILL, 2, 128 + signal.SIGINT):
                failures.append(f"{name}, after {fault} {n}: exit {code}: {output[-2000:]}")  # and on: does it resume?
            if code == 0:
                done = True
                break
        fired.update(met)
        trials_with.update(met.keys())
        if not done:
            failures.append(f"{name}: did not finish")
        else:
            problems = _compare_with_uninterrupted(out, expectations.of(variant), damaged)
            failures += [f"{name}: {p}" for p in problems]
        if progress:
            progress.write_text(json.dumps(figures(trial + 1)))
    return figures(trials)


def _largest(fault: str, variant: Variant) -> int:
    if fault.startswith("full-disk:"):
        return WRITERS[fault.split(":", 1)[1]][1]
    largest = SITES.get(fault, 9 if fault == "ctrl-c-twice" else 1)
    if fault in ("step", "ctrl-c-twice") and variant.accumulation:
        # Counted in optimizer steps: 6 a run with --accum_iter 4, not 18 (it then never got there).
        largest //= 3
    return largest


def _loads(path: str) -> bool:
    try:
        safe_load.load_checkpoint(path)
    except UserError:
        return False
    return True


def _compare_with_uninterrupted(out: Path, expected: Expected, damaged: dict[str, tuple[int, int]]) -> list[str]:
    """The compared checkpoints' states (weights, optimizer, random state, ...), their log history,
    log.txt and the checkpoints left (pruning) each against the uninterrupted run's: findings apart
    rather than the first one. A kept checkpoint still damaged on purpose is left out of the
    comparison (no run had to write it again)."""
    problems = []
    if expected.names is not None and _checkpoint_names(out) != expected.names:
        problems.append(f"checkpoints left {_checkpoint_names(out)}, the uninterrupted run's {expected.names}")
    for name, wanted in expected.checkpoints.items():
        if (out / name).exists() and _is_damaged(str(out / name), damaged):
            continue
        if not (out / name).exists():
            problems.append(f"{name} missing")
            continue
        got = _comparable(out / name)
        try:
            assert_same({k: v for k, v in got.items() if k != "log"}, {k: v for k, v in wanted.items() if k != "log"})
        except AssertionError as e:
            problems.append(f"{name} differs from the uninterrupted run's: checkpoint{e}")
        try:
            assert_same(got.get("log"), wanted.get("log"), "log")
        except AssertionError as e:
            problems.append(f"{name}'s log history differs from the uninterrupted run's: {e}")
    if _log_lines(out) != expected.log:
        problems.append(f"log.txt {_log_lines(out)} differs from {expected.log}")
    if _temporaries(out):
        problems.append(f"temporary files left: {_temporaries(out)}")
    return problems


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=5, help="faults per trial before it may finish")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    parser.add_argument("--reference", default="", help="a folder holding helpers.Reference.make's run, to reuse")
    parser.add_argument("--report", default="", help="write the result as JSON here")
    parser.add_argument("--entry", default="pretrain", choices=ENTRIES, help="the entry point run under faults")
    parser.add_argument("--kinds", default="", help="the kinds of fault to draw, comma-separated (default: all)")
    return parser


def main() -> None:
    parser = get_args_parser()
    args = parser.parse_args()
    known = ENTRIES[args.entry].kinds
    kinds = args.kinds.split(",") if args.kinds else known
    if not set(kinds) <= set(known):
        parser.error(f"--kinds: unknown to {args.entry} {sorted(set(kinds) - set(known))}; known: {', '.join(known)}")
    reference = Reference.read(Path(args.reference)) if args.reference else None
    report = Path(args.report) if args.report else None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        result = campaign(args.trials, args.seed, args.faults, workdir, reference, kinds, report, args.entry)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = campaign(args.trials, args.seed, args.faults, Path(tmp), reference, kinds, report, args.entry)
    print(json.dumps(result, indent=1))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
