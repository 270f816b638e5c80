"""gpu_check.sh part 2: the CUDA tests (tests/test_cuda.py), counted from pytest's JUnit XML; each
failure's test and first line become an error."""

import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

from benchmarks.gpu_check_common import REPO, PartRecord, Sizes, run_part


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


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    junit = Path(record.path).with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}"]
    result = subprocess.run([*command, "tests/test_cuda.py"], cwd=REPO)
    if not junit.is_file():
        raise RuntimeError(f"pytest exited with status {result.returncode} and wrote no report")
    counts = count(junit, record)
    record.set("cuda_tests", {"passed": counts["passed"], "failed": counts["failed"]})
    record.set("cuda_tests_skipped", counts["skipped"])


if __name__ == "__main__":
    run_part("tests", main)
