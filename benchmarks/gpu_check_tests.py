"""gpu_check.sh part 2: the CUDA tests (tests/test_cuda.py), counted from pytest's JUnit XML; each
failure's test and first line become an error.

pytest runs in its own process group and is stopped (with what it started: torchrun and its
workers) a little before this part's own timeout, so that a test that hangs (an NCCL start-up, say)
still leaves the counts of the tests before it, read from pytest's verbose lines, and its own name.
Nothing it started outlives it: the parts after this one measure on an idle GPU and idle cores.
"""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from benchmarks.gpu_check_common import REPO, PartRecord, Sizes, run_part, seconds_left

MARGIN_S = 10  # kept to stop pytest and write the counts before this part's timeout
# For pytest and what is below it to end on SIGTERM before SIGKILL: under the 5 s that gpu_check.sh's timeout leaves
# this part between its own SIGTERM and SIGKILL, so that the SIGKILLs below are sent before this part's.
STOP_GRACE_S = 3.0
# The suite hides the GPUs from its tests unless this is 1 (tests/conftest.py): without it, every CUDA test skips.
CUDA_OPT_IN = {"MAE_TEST_CUDA": "1"}
OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")


def count(junit: Path, record: PartRecord) -> dict[str, int]:
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit).iter("testcase"):
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
        else:
            counts["failed"] += 1
            record.error(f"{case.get('name')} {outcome.tag}: {(outcome.get('message') or '').splitlines()[:1]}")
    return counts


def count_verbose(lines: list[str]) -> tuple[dict[str, int], list[str], str | None]:
    """Counts from ``pytest -v`` lines (``path::test OUTCOME``), the tests that failed, and the test
    that was running when they stop (a line naming a test without an outcome), if any."""
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    kinds = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "failed"}
    failed, running = [], None
    for line in lines:
        match = OUTCOME.match(line)
        if match:
            kind = kinds.get(match.group(2), "skipped")
            counts[kind] += 1
            failed += [match.group(1)] if kind == "failed" else []
            running = None
        elif "::" in line and line.split()[0].startswith("tests/"):
            running = line.split()[0]
    return counts, failed, running


def run_pytest(command: list[str], log: Path, seconds: float | None) -> int | None:
    """pytest's exit status, or None where it was stopped after ``seconds``; its output in ``log``, and
    printed (into gpu_check.log) however it ends."""
    with open(log, "w") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            env={**os.environ, **CUDA_OPT_IN},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            return process.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if process.poll() is None:  # also when this part is stopped (SIGTERM, below)
                stop(process)
            print(log.read_text(errors="replace"), flush=True)


def stop(process: subprocess.Popen) -> None:
    """End pytest, its process group and every process below it. torchrun starts each rank in a session of its
    own, which a signal to pytest's group misses, and our ranks take SIGTERM as a request to stop at their next
    step (util/train/interrupt.py): one still compiling outlived pytest and torchrun (both killed 5 s later),
    adopted by init, on the GPU and the cores the next part measures with. So the processes below pytest are
    listed before its group is signalled and again before the SIGKILL (while a rank still names its own
    children), and each is killed."""
    below = set(descendants(process.pid))
    os.killpg(process.pid, signal.SIGTERM)  # torchrun passes it on to its ranks
    end = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < end and (process.poll() is None or any(map(running, below))):
        time.sleep(0.1)
    below.update(p for pid in [process.pid, *below] for p in descendants(pid))
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    process.wait()
    end = time.monotonic() + STOP_GRACE_S  # SIGKILL takes effect a moment later, a GPU's memory is freed after
    while time.monotonic() < end and any(map(running, below)):
        time.sleep(0.1)


def parents() -> dict[int, int]:
    """Every process's parent, from /proc (Linux)."""
    found = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):  # not a process, or one that just ended
            stat = Path("/proc", entry, "stat").read_text()
            found[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
    return found


def descendants(pid: int) -> list[int]:
    """The processes below ``pid``: its children, theirs, and so on."""
    links, found, level = parents(), [], [pid]
    while level:
        level = [child for child, parent in links.items() if parent in level]
        found += level
    return found


def running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has: its parent has not read its status yet)."""
    try:
        return Path("/proc", str(pid), "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # runs run_pytest's finally: no test left behind
    junit, log = Path(record.path).with_suffix(".xml"), Path(record.path).with_suffix(".txt")
    command = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}"]
    left = seconds_left()
    status = run_pytest([*command, "tests/test_cuda.py"], log, None if left is None else left - MARGIN_S)
    lines = log.read_text(errors="replace").splitlines()
    if status is None:
        counts, failed, running = count_verbose(lines)
        for name in failed:
            record.error(f"{name} failed (gpu_check.log has its output)")
        record.error(f"pytest stopped at this part's time limit, in {running or 'an unknown test'}")
    elif not junit.is_file():
        raise RuntimeError(f"pytest exited with status {status} and wrote no report")
    else:
        counts = count(junit, record)
    record.set("cuda_tests", {"passed": counts["passed"], "failed": counts["failed"]})
    record.set("cuda_tests_skipped", counts["skipped"])


if __name__ == "__main__":
    run_part("tests", main)
