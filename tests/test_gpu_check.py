"""benchmarks/gpu_check.sh --cpu: the GPU check's script runs here, at toy sizes, before device
time is spent on it. A subset of its parts (env and step: about 30 s on 2 busy cores; all five take about 80)
with env forced to crash: its error lands in the summary, the step part still gives rows."""

import json
import os
import subprocess
import sys

from helpers import REPO

STEP_KEYS = {"model": str, "impl": str, "batch": int, "img_s": float, "img_s_min": float, "img_s_max": float}
IMPLS = {"official_as_shipped", "official_in_our_loop", "ours_eager", "ours_compiled"}


def test_cpu_check_writes_the_summary_and_reports_a_crashed_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.update(GPU_CHECK_PARTS="env step", GPU_CHECK_FAIL="env")
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(summary) == ["versions", "matmul_tflops", "cuda_tests", "step", "loader", "e2e", "errors"]
    assert isinstance(summary["versions"], dict) and summary["cuda_tests"] == {"passed": 0, "failed": 0}
    assert summary["matmul_tflops"] is None  # the env part, which measures it, crashed
    assert any(e.startswith("env: crashed: RuntimeError: forced failure") for e in summary["errors"]), summary
    assert all(isinstance(e, str) and "\n" not in e for e in summary["errors"])

    assert {r["impl"] for r in summary["step"]} >= {"ours_eager", "ours_compiled"}
    for row in summary["step"]:
        assert row["impl"] in IMPLS
        for key, kind in STEP_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["img_s_min"] <= row["img_s"] <= row["img_s_max"]
        assert 0 < row["mfu"] and (row["peak_mem_gib"] is None or row["peak_mem_gib"] > 0)
    assert summary["loader"] == [] and summary["e2e"] == []  # not asked for
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| ours_compiled |" in markdown and "forced failure" in markdown
    assert "===== step" in (tmp_path / "gpu_check.log").read_text()
