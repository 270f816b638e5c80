"""A fault campaign against pre-training: kill -9 at random moments (in training, inside checkpoint
writes, between a checkpoint's write and its rename, after the rename, while pruning, while log.txt
is written), resume with ``--resume auto``, and check what the README promises:

- after every kill, every ``checkpoint-*.pth`` in the folder loads, and log.txt has no epoch twice;
- in the end the final checkpoint equals an uninterrupted run's bitwise (weights, optimizer, random
  state, log history), log.txt equals its log.txt (each epoch once, the same losses), and no
  temporary file is left.

Some faults are not kills: the newest checkpoint loses its tail (a damaged disk), so that
``--resume auto`` falls back to an earlier one.

    python tests/fault_campaign.py --trials 100 --seed 7      # by hand; tests/test_fault_campaign.py runs a few

One driver process imports torch once and forks every run, which then runs ``main_pretrain`` as
the command line does (kills are SIGKILL, from the driver after a random delay, or sent by the run
to itself at the chosen point). Runs are single-threaded, as bitwise comparisons need. The
uninterrupted run they are compared with is helpers.Reference, on the command line; ``--reference``
reuses one (the test suite's, which test_resilience shares).
"""

import argparse
import builtins
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

os.environ["OMP_NUM_THREADS"] = "1"  # before torch: the same float sums in every run
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from helpers import RESUMABLE_EPOCHS as EPOCHS  # noqa: E402
from helpers import Reference, assert_same, budgeted_open, resumable_flags  # noqa: E402

import main_pretrain  # noqa: E402
from util.checkpoint import files as checkpoint_files  # noqa: E402  (listing only)
from util.checkpoint import load as safe_load  # noqa: E402
from util.cli.errors import UserError  # noqa: E402

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
}
FAULTS = [*SITES, "timer", "damage"]  # timer: the driver kills after a random delay


# ---------------------------------------------------------------------------------------------
# In the forked run
def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(site: str, n: int, cut: int) -> None:
    """Kill this process at the ``n``-th occurrence of ``site`` (``cut``: the bytes of a checkpoint
    written before a 'ckpt-write' kill)."""
    seen = [0]

    def hit(here: str) -> bool:
        if here == site:
            seen[0] += 1
            return seen[0] == n
        return False

    real_step = torch.optim.AdamW.step

    def step(self, *a, **k):
        out = real_step(self, *a, **k)
        if hit("step"):
            _die()
        return out

    torch.optim.AdamW.step = step

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


def _run(argv: list[str], log: Path, site: str | None = None, n: int = 0, cut: int = 0) -> int:
    """Fork a run of ``main_pretrain.py argv``; returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if site:
            _arm(site, n, cut)
        main_pretrain.run_cli(lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv)))
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _wait(pid: int, kill_after: float | None = None) -> int:
    """Wait for the run (SIGKILL it after ``kill_after`` seconds); its exit code, or -signal."""
    begin = time.time()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG if kill_after is not None else 0)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.time() - begin > kill_after:
            os.kill(pid, signal.SIGKILL)
            kill_after = None
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
        st = path.stat()
        if damaged.get(str(path)) == (st.st_size, st.st_mtime_ns):
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


def _final(out: Path) -> dict[str, Any]:
    ckpt = safe_load.load_checkpoint(str(out / f"checkpoint-{EPOCHS - 1}.pth"))
    ckpt["args"] = {k: v for k, v in vars(ckpt["args"]).items() if k != "output_dir"}
    return ckpt


def _when(fault: str) -> int:
    return {"log-rewrite": 0, "damage": 2}.get(fault, 1)


def campaign(
    trials: int, seed: int, faults_per_trial: int, workdir: Path, reference: Reference | None = None
) -> dict[str, Any]:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    begin = time.time()
    reference = reference or Reference.make(workdir)
    data, ref_seconds = reference.data, reference.seconds
    expected, expected_log = _final(reference.out), _log_lines(reference.out)
    size = (reference.out / f"checkpoint-{EPOCHS - 1}.pth").stat().st_size

    # Every kind of fault in turn (in a shuffled order), so that a few trials cover them all.
    order = [f for _ in range(trials * faults_per_trial // len(FAULTS) + 1) for f in rng.sample(FAULTS, len(FAULTS))]
    fired: dict[str, int] = {f: 0 for f in FAULTS}
    failures, runs = [], 0
    for trial in range(trials):
        out, log = workdir / f"trial{trial}", workdir / f"trial{trial}.log"
        damaged: dict[str, tuple[int, int]] = {}
        done = False
        # A rewrite of log.txt happens on a fresh start (or after a drift), damage needs a checkpoint.
        faults = sorted(order[trial * faults_per_trial : (trial + 1) * faults_per_trial], key=_when)
        for fault in [*faults, None]:
            if fault == "damage":
                newest = checkpoint_files.list_checkpoints(str(out))
                if newest:
                    blob = Path(newest[-1]).read_bytes()
                    Path(newest[-1]).write_bytes(blob[: rng.randrange(len(blob))])
                    st = os.stat(newest[-1])
                    damaged[newest[-1]] = (st.st_size, st.st_mtime_ns)
                    fired[fault] += 1
                continue
            site = fault if fault in SITES else None
            n = rng.randint(1, SITES[site]) if site else 0
            with open(log, "a") as f:
                f.write(f"=== trial {trial}: fault {fault} {n}\n")
            pid = _run(resumable_flags(data, out), log, site, n, rng.randrange(size))
            code = _wait(pid, rng.uniform(0, ref_seconds / 2) if fault == "timer" else None)
            runs += 1
            if code == -signal.SIGKILL:
                fired[fault] += 1
                failures += [f"trial {trial}, after {fault} {n}: {p}" for p in _check_after_fault(out, damaged)]
            elif code == 0:
                done = True
                break
            else:
                failures.append(f"trial {trial}, after {fault} {n}: exit {code}: {log.read_text()[-2000:]}")
                break
        if not done:
            failures.append(f"trial {trial}: did not finish")
            continue
        try:
            assert_same(_final(out), expected, "checkpoint")
        except AssertionError as e:
            failures.append(f"trial {trial}: final checkpoint differs from the uninterrupted run's: {e}")
        if list(out.glob("*.tmp*")):
            failures.append(f"trial {trial}: temporary files left: {sorted(p.name for p in out.glob('*.tmp*'))}")
        if _log_lines(out) != expected_log:
            failures.append(f"trial {trial}: log.txt {_log_lines(out)} differs from {expected_log}")
    return {
        "trials": trials,
        "seed": seed,
        "runs": runs,
        "faults": fired,
        "failures": failures,
        "seconds": round(time.time() - begin, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=3, help="faults per trial before it may finish")
    parser.add_argument("--workdir", default="", help="default: a temporary folder")
    parser.add_argument("--reference", default="", help="a folder holding helpers.Reference.make's run, to reuse")
    parser.add_argument("--report", default="", help="write the result as JSON here")
    args = parser.parse_args()
    reference = Reference.read(Path(args.reference)) if args.reference else None
    if args.workdir:
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        result = campaign(args.trials, args.seed, args.faults, workdir, reference)
    else:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            result = campaign(args.trials, args.seed, args.faults, Path(tmp), reference)
    print(json.dumps(result, indent=1))
    if args.report:
        Path(args.report).write_text(json.dumps(result))
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
