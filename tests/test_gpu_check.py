"""benchmarks/gpu_check.sh --cpu: the GPU check's script runs here, at toy sizes, before device
time is spent on it. A subset of its parts (tests and cifar: about 14 s on 2 busy cores; all six take about 50)
with tests forced to crash: its error lands in the summary, the cifar part still gives its rows. In process:
what only a GPU would show (running out of memory, a test that hangs, a part killed by its timeout)
through the functions that handle it, and the fine-tuning step's FLOPs."""

import argparse
import ast
import dataclasses
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time
import weakref
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import REPO
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import models_mae
import models_vit
from benchmarks import (
    bench_pretrain,
    gpu_check_env,
    gpu_check_loader,
    gpu_check_official,
    gpu_check_summary,
    gpu_check_tests,
)
from benchmarks.bench_pretrain import vit_train_flops
from benchmarks.gpu_check_common import CPU, DEADLINE_ENV, PartRecord, time_for
from benchmarks.gpu_check_step import LARGEST_BATCH_SHARE, batch_tries, first_that_fits
from benchmarks.gpu_check_tests import count_verbose, run_pytest
from util.cli.errors import fail

STEP_KEYS = {"model": str, "impl": str, "batch": int, "img_s": float, "img_s_min": float, "img_s_max": float}
IMPLS = {"official_as_shipped", "official_in_our_loop", "ours_eager", "ours_compiled"}


def test_cpu_check_writes_the_summary_and_reports_a_crashed_part(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    env.update(GPU_CHECK_PARTS="tests cifar", GPU_CHECK_FAIL="tests")  # the parts that start quickest
    env.update(WHEELS=str(tmp_path / "no-wheels"))  # not a wheels/ this checkout may hold
    result = subprocess.run(
        ["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert list(summary) == ["versions", "matmul_tflops", "cuda_tests", "step", "loader", "e2e", "errors"]
    assert isinstance(summary["versions"], dict) and summary["cuda_tests"] == {"passed": 0, "failed": 0}
    assert summary["matmul_tflops"] is None  # the env part, which measures it, did not run
    assert any(e.startswith("tests: crashed: RuntimeError: forced failure") for e in summary["errors"]), summary
    assert all(isinstance(e, str) and "\n" not in e for e in summary["errors"])

    # The study's pre-training step eager and compiled, and its fine-tuning step (at toy size).
    kinds = {(r["model"], r["impl"], r["variant"]) for r in summary["step"]}
    assert kinds == {(m, i, v) for m, v in (("mae_vit_mini_patch4", ""), ("vit_mini_patch4", "fine-tuning"))
                     for i in ("ours_eager", "ours_compiled")}  # fmt: skip
    for row in summary["step"]:
        assert row["impl"] in IMPLS and row["input_size"] == 32
        for key, kind in STEP_KEYS.items():
            assert isinstance(row[key], kind), (key, row)
        assert row["img_s_min"] <= row["img_s"] <= row["img_s_max"]
        assert 0 < row["mfu"] and (row["peak_mem_gib"] is None or row["peak_mem_gib"] > 0)
    peaks = {row["tflops"] / row["mfu"] for row in summary["step"]}  # MFU: TFLOP/s over the one measured peak
    assert max(peaks) == pytest.approx(min(peaks))
    [loader] = summary["loader"]
    assert loader["loader"] == "memory" and loader["img_s"] > 0 and loader["batch"] == 8
    assert [r["pipeline"] for r in summary["e2e"]] == ["ours_memory", "ours_memory_eager"]
    assert all(r["img_s"] > 0 and 0 <= r["data_wait"] < 1 for r in summary["e2e"])
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| ours_compiled |" in markdown and "forced failure" in markdown
    assert "plan.py --model mae_vit_mini_patch4 --mfu" in markdown  # the study's re-plan
    assert "===== cifar" in (tmp_path / "gpu_check.log").read_text()


def test_a_part_killed_by_its_timeout_keeps_its_rows(tmp_path):
    """gpu_check.sh writes the part's exit status (124: timeout) beside the record the part rewrote after each row."""
    rows = {"loader": [{"loader": "memory", "workers": 0, "img_s": 5.0}]}
    record = {"part": "cifar", "values": {}, "rows": rows, "errors": []}
    (tmp_path / "cifar.json").write_text(json.dumps(record))
    (tmp_path / "cifar.rc").write_text("124\n")
    (tmp_path / "step.rc").write_text("skipped\n")
    summary, _ = gpu_check_summary.summarize(tmp_path)
    assert summary["loader"] == rows["loader"]
    assert summary["errors"] == [
        "cifar: timed out (status 124); the rows it had measured are kept",
        "step: not run, no time left in the check's budget",
    ]


def _part(work, part: str, values: dict, rows: dict | None = None) -> None:
    (work / f"{part}.json").write_text(json.dumps({"part": part, "values": values, "rows": rows or {}, "errors": []}))


def test_the_summary_names_the_gpu_that_ran_and_files_its_results_under_it(tmp_path, capsys):
    """The device tool gives an H100 or an H200: the summary records which, with its memory, and suggests the
    file stem from it; a part rerun without env (its own record names the GPU) still does."""
    h100 = {"gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0", "gpu_memory_gib": 79.1, "date": "2026-12-06"}
    _part(tmp_path, "env", {**h100, "versions": {"torch": "2.11.0", **h100}, "matmul_tflops": 798.0})
    gpu_check_summary.main(["--work", str(tmp_path), "--out", str(tmp_path), "--print"])
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert (summary["versions"]["gpu"], summary["versions"]["gpu_memory_gib"]) == (h100["gpu"], 79.1)
    assert "benchmarks/results/h100-2026-12-06.json and .md" in (tmp_path / "gpu_check.md").read_text()
    assert capsys.readouterr().out.splitlines()[-1] == "commit them as benchmarks/results/h100-2026-12-06.json and .md"

    rerun = tmp_path / "rerun"
    rerun.mkdir()
    _part(rerun, "step", {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "peak_tflops": 790.0})
    versions = gpu_check_summary.summarize(rerun)[0]["versions"]
    assert versions == {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8}
    assert gpu_check_summary.result_stem(versions).startswith("h200-20")  # today's date
    for name, stem in [("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA GeForce RTX 4090", "nvidia-geforce-rtx-4090")]:
        assert gpu_check_summary.result_stem({"gpu": name, "date": "2026-01-02"}) == f"{stem}-2026-01-02"
    assert gpu_check_summary.result_stem({"date": "2026-01-02"}) == "cpu-2026-01-02"  # --cpu: toy sizes


def test_the_study_lines_divide_by_the_matmul_rate_measured_in_the_run():
    """On an H100 the run measures its own peak (798 TFLOP/s, say): the MFU and plan.py's re-plan use it, not
    plan.py's default 790."""
    row = {"model": "mae_vit_tiny_patch2", "impl": "ours_eager", "variant": "", "img_s": 30_000.0}
    row.update(tflops=114.6, mfu=114.6 / 798)
    [line] = gpu_check_summary.study_lines({"rows": {"step": [row]}})
    assert "14.4% MFU of the 798 measured here" in line
    assert line.endswith("plan.py --model mae_vit_tiny_patch2 --mfu 0.144 --peak_tflops 798")


def test_the_largest_batch_search_frees_the_memory_of_a_batch_that_did_not_fit():
    """A GPU runs out of memory in the step at the estimated batch: the next batch is tried once the
    failed one's tensors are gone (the exception's traceback held them); a refusal of util.memory.require
    counts alike."""
    held: list[weakref.ref] = []

    def measure(batch: int) -> str:
        assert all(ref() is None for ref in held), "the failed try's tensors are still alive"
        activations = torch.empty(batch, 1024)
        held.append(weakref.ref(activations))
        if batch > 128:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {batch} MiB\nmore")
        if batch > 64:
            fail(f"the step at batch {batch} needs more than is free")
        return f"measured {batch}"

    device = torch.device("cpu")
    batch, result, failures = first_that_fits(measure, [256, 192, 128, 64], device)
    assert (batch, result) == (64, "measured 64") and len(held) == 4
    assert failures == [
        "batch 256: OutOfMemoryError: CUDA out of memory. Tried to allocate 256 MiB",
        "batch 192: OutOfMemoryError: CUDA out of memory. Tried to allocate 192 MiB",
        "batch 128: UserError: the step at batch 128 needs more than is free",
    ]
    with pytest.raises(RuntimeError, match="no batch fitted: batch 256: OutOfMemoryError"):
        first_that_fits(measure, [256], device)
    with pytest.raises(ValueError):  # any other error is not a batch that did not fit: it goes up
        first_that_fits(lambda batch: int("not a batch"), [64], device)


@pytest.mark.parametrize("gpu, free_gib", [("H100", 78.6), ("H200", 139.2), ("H200 with 60 GiB held", 79.2)])
def test_the_largest_batch_is_sized_from_the_free_memory(gpu, free_gib):
    """ViT-B/16's batch-256 peak (about 40 MiB an image above 1.7 GiB of weights, gradients and AdamW state):
    the tries are multiples of 64 whose estimate fills at most 92% of what is free, the largest such, then 80%
    of it; an H100 (or an H200 whose memory is partly held) gets a smaller batch, not an out-of-memory try."""
    per_image, fixed, free = 40 * 2**20, 1.7 * 2**30, free_gib * 2**30
    first, second = batch_tries(per_image, fixed, free)
    assert first % 64 == 0 and second == int(0.8 * first) // 64 * 64
    assert fixed + per_image * first <= LARGEST_BATCH_SHARE * free < fixed + per_image * (first + 64)
    assert batch_tries(per_image, fixed, 2 * 2**30) == []  # not even a batch of 64 fits


def test_counts_of_a_pytest_run_stopped_in_a_test():
    lines = [
        "tests/test_cuda.py::test_device_loader PASSED                    [ 10%]",
        "tests/test_cuda.py::test_mixed_precision[bf16] FAILED            [ 20%]",
        "tests/test_cuda.py::test_two_gpus SKIPPED (needs two GPUs)       [ 30%]",
        "tests/test_cuda.py::test_fused_adamw ERROR                       [ 40%]",
        "tests/test_cuda.py::test_torchrun_one_process ",
    ]
    counts, failed, running = count_verbose(lines)
    assert counts == {"passed": 1, "failed": 2, "skipped": 1}
    assert failed == ["tests/test_cuda.py::test_mixed_precision[bf16]", "tests/test_cuda.py::test_fused_adamw"]
    assert running == "tests/test_cuda.py::test_torchrun_one_process"
    assert count_verbose(lines[:4])[2] is None  # it ended after a test


# A stand-in for torchrun: its rank runs in a session of its own (as torch.distributed.elastic starts it), takes
# SIGTERM for a request to stop at its next step (as util/train/interrupt.py does) and sleeps on (a compilation);
# torchrun, on SIGTERM, passes it on and waits for the rank.
FAKE_RANK = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: None)
open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))
os.rename(sys.argv[1] + '.tmp', sys.argv[1])
time.sleep(120)
"""
FAKE_TORCHRUN = f"""
import signal, subprocess, sys
rank = subprocess.Popen([sys.executable, '-c', {FAKE_RANK!r}, sys.argv[1]], start_new_session=True)
signal.signal(signal.SIGTERM, lambda *_: rank.send_signal(signal.SIGTERM))
rank.wait()
"""


def _running(pid: int) -> bool:
    """Whether process ``pid`` has not ended (a zombie has)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_a_stopped_pytest_leaves_no_process_behind(tmp_path, monkeypatch):
    """The tests part stops pytest at its time limit: a torchrun rank (in a session of its own, deaf to SIGTERM
    until its next step) is ended with it, not left on the GPU and the cores while the next parts measure."""
    monkeypatch.setattr(gpu_check_tests, "STOP_GRACE_S", 0.5, raising=False)
    pid_file = tmp_path / "rank.pid"
    try:
        assert run_pytest([sys.executable, "-c", FAKE_TORCHRUN, str(pid_file)], tmp_path / "log.txt", 4) is None
        assert not _running(int(pid_file.read_text())), "the rank outlived the stopped pytest"
    finally:
        if pid_file.is_file() and _running(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_the_loader_part_times_the_batches_of_one_epoch(tmp_path, monkeypatch):
    """At an epoch's end the loader's workers drain and refill: the loader part times no batch past the first
    epoch of its list (here 44 lines: 5 batches of 8, the 4 lines over dropped), so 2 warm-up and 3 timed
    batches of the 8 that 64 images would take."""
    files = sorted((REPO / "demo" / "cifar10-2k" / "cat").glob("*.jpg"))[:10]
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{files[i % 10]}\n" for i in range(44)))
    monkeypatch.setattr(gpu_check_loader, "data_path", lambda sizes: str(listing))
    epochs, endless_batches = [], bench_pretrain.endless_batches

    def counting_epochs(loader, device):
        set_epoch = loader.sampler.set_epoch
        loader.sampler.set_epoch = lambda epoch: (epochs.append(epoch), set_epoch(epoch))
        return endless_batches(loader, device)

    monkeypatch.setattr(bench_pretrain, "endless_batches", counting_epochs)
    record = PartRecord("loader", tmp_path / "loader.json")
    gpu_check_loader.main(record, dataclasses.replace(CPU, batch=8, workers=0, loader_images=64), torch.device("cpu"))
    assert record.errors == [] and [r["loader"] for r in record.rows["loader"]] == ["fast", "device", "torchvision"]
    assert epochs == [0, 0, 0]  # each loader's first epoch, and no other


def test_the_models_are_initialised_on_the_device_they_train_on(monkeypatch):
    """Initialising ViT-L/16 took 3.4-4.9 s on a CPU, and the step part builds seven (its reference, the official
    impls', ours): each model is built where it runs (here the meta device, as the GPU would be), not on the CPU
    and moved."""
    built_on, create = [], models_mae.create_model

    def recording(*args, **kwargs):
        model = create(*args, **kwargs)
        built_on.append(model.pos_embed.device.type)  # as created, before any move
        return model

    monkeypatch.setattr(models_mae, "create_model", recording)
    args = argparse.Namespace(model="mae_vit_large_patch16", input_size=224, device="meta", mask_ratio=0.75)
    args.grad_checkpointing = args.compile = False
    model, _ = bench_pretrain.build_step(args, "fp32", plain=True)
    assert built_on == ["meta"] and model.pos_embed.device.type == "meta"
    if gpu_check_official.missing_reason() is None:  # the official code, where fetch_official.sh extracted it
        official = gpu_check_official.official_model(model)  # its weights copied from ours, on the meta device
        assert {p.device.type for p in official.parameters()} == {"meta"}


def test_fetch_official_extracts_every_module_the_official_checks_import():
    """fetch_official.sh's FILES and gpu_check_official.MODULES are two lists of the same files: a module added to
    one alone made official_parity.py and gpu_check.sh stop at 'no lars.py of the official code' after a fetch."""
    text = (REPO / "benchmarks" / "fetch_official.sh").read_text()
    files = set(re.search(r"^FILES=\((.*?)\)", text, flags=re.S | re.M).group(1).split())
    imported = {module.replace(".", "/") + ".py" for module in gpu_check_official.MODULES}
    assert sorted((imported | {"LICENSE"}) - files) == []


@pytest.mark.parametrize(
    "size_gib, root, mount_status, expected",
    [
        (24.0, True, None, {"shm_gib": 24.0}),  # roomy: left as it is
        (1.5, False, None, {"shm_gib": 1.5}),  # small, but not root: only said
        (1.5, True, 0, {"shm_gib": 16.0, "shm_gib_before_remount": 1.5}),
        (1.5, True, 32, {"shm_gib": 1.5, "shm_error": "mount: permission denied"}),
        # no mount command on the machine: said, and the env part goes on to its versions and matmuls
        (1.5, True, "absent", {"shm_gib": 1.5, "shm_error": "[Errno 2] No such file or directory: 'mount'"}),
    ],
)
def test_a_small_dev_shm_is_made_roomy_for_the_loader_workers(monkeypatch, size_gib, root, mount_status, expected):
    """15 workers of a float pipeline hold up to 4.6 GB in /dev/shm; a smaller one kills them with a bus error and
    loses the official pipeline's row. The env part remounts it larger where it can, and says what it found."""
    sizes, mounts = {"/dev/shm": size_gib}, []

    def mount(command, **kwargs):
        mounts.append(command)
        if mount_status == "absent":
            raise FileNotFoundError(2, "No such file or directory", "mount")
        if mount_status == 0:
            sizes["/dev/shm"] = 16.0
        return subprocess.CompletedProcess(command, mount_status, "", "mount: permission denied" * bool(mount_status))

    monkeypatch.setattr(gpu_check_env, "gib_of", sizes.__getitem__)
    monkeypatch.setattr(gpu_check_env.os, "geteuid", lambda: 0 if root else 1000)
    monkeypatch.setattr(gpu_check_env.subprocess, "run", mount)
    assert gpu_check_env.roomy_shm("/dev/shm") == expected
    assert mounts == ([["mount", "-o", "remount,size=16G", "/dev/shm"]] if root and size_gib < 8 else [])


def test_versions_name_the_open_files_limit_loader_workers_run_under():
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert gpu_check_env.versions(torch.device("cpu"))["open_files_limit"] == soft


def test_dev_shm_size_is_read_in_gib(tmp_path):
    stat = os.statvfs(tmp_path)
    assert gpu_check_env.gib_of(str(tmp_path)) == stat.f_blocks * stat.f_frsize / 2**30 > 0


def test_fine_tuning_flops_match_a_hand_count_and_torchs_counter():
    # vit_tiny_patch2 at 32 px: 256 patches of 2*2*3 = 12 values, 257 tokens, 12 blocks of 192-d, 10 classes.
    model = models_vit.create_model("vit_tiny_patch2", 32, 3, num_classes=10, global_pool=True)
    forward = 2 * 256 * 12 * 192 + 12 * 257 * (24 * 192**2 + 4 * 257 * 192) + 2 * 192 * 10
    assert vit_train_flops(model, batch=2) == 3 * 2 * forward
    assert round(3 * forward / 1e9, 2) == 10.02  # recipes/cifar10_gpu/README.md's figure per image
    small = models_vit.create_model("vit_mini_patch4", 32, 3, num_classes=10, global_pool=False)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        small(torch.randn(2, 3, 32, 32))
    assert counter.get_total_flops() * 3 == vit_train_flops(small, batch=2)


def test_a_measurement_without_time_for_it_is_left_out_and_said(tmp_path, monkeypatch):
    record = PartRecord("step", tmp_path / "step.json")
    monkeypatch.setenv(DEADLINE_ENV, str(time.time() + 30.4))  # gpu_check.sh's kill comes in 30 s
    assert time_for(record, "largest batch", 20) and record.errors == []
    assert not time_for(record, "largest batch", 70)
    assert json.loads((tmp_path / "step.json").read_text())["errors"] == [
        "step: largest batch: left out, 30 s left of the part's time and it needs about 70"
    ]
    monkeypatch.delenv(DEADLINE_ENV)  # run on its own: no deadline
    assert time_for(record, "largest batch", 10**6)


def test_fetch_wheels_without_timm_says_which_python_in_one_line(tmp_path):
    """fetch_wheels.sh takes timm's release from PYTHON (python3 by default): one without timm (a machine's own
    python3 outside the virtual environment) is named in one line, and wheels/ is left as it is."""
    python = tmp_path / "python3"  # a Python without site-packages: no timm
    python.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    python.chmod(0o755)
    env = {**os.environ, "PYTHON": str(python)}
    result = subprocess.run(
        ["bash", "benchmarks/fetch_wheels.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {python} has no timm to take the release of; give PYTHON=.venv/bin/python, or NAME==VERSION"
    ]


def _pure_python_wheel(folder, name: str, version: str):
    """The smallest wheel pip installs: one module, its metadata and a RECORD without hashes."""
    path = folder / f"{name}-{version}-py3-none-any.whl"
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"__version__ = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{f},,\n" for f in [*files, f"{info}/RECORD"])
    with zipfile.ZipFile(path, "w") as archive:
        for member, text in files.items():
            archive.writestr(member, text)
    return path


def test_carried_wheels_come_first_on_the_python_path(tmp_path):
    """benchmarks/use_wheels.sh: the wheels in WHEELS are installed into SITE, put first on
    PYTHONPATH (before the machine's own packages); a nested call changes nothing; a later run with
    another release in WHEELS gets that release in the same SITE; no wheels, or wheels pip refuses,
    no change."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _pure_python_wheel(wheels, "probe_pkg", "1.0")
    site = tmp_path / "site"
    script = f"""source benchmarks/use_wheels.sh; use_wheels {site}; use_wheels {site}; echo "$PYTHONPATH"
        "$PYTHON" -c 'import probe_pkg; print(probe_pkg.__file__, probe_pkg.__version__)' """

    def run(folder):
        env = {**os.environ, "PYTHON": sys.executable, "WHEELS": str(folder), "PYTHONPATH": "/elsewhere"}
        return subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)

    used = run(wheels)
    assert used.returncode == 0, used.stderr
    assert used.stdout.splitlines() == [f"{site}:/elsewhere", f"{site / 'probe_pkg' / '__init__.py'} 1.0"]
    assert used.stderr.count("using probe_pkg-1.0-py3-none-any.whl over the machine's packages") == 1, used.stderr
    for old in wheels.iterdir():
        old.unlink()
    _pure_python_wheel(wheels, "probe_pkg", "2.0")
    assert run(wheels).stdout.splitlines()[-1].endswith(" 2.0")
    none = run(tmp_path / "empty")
    assert none.stdout.splitlines() == ["/elsewhere"] and "No module named 'probe_pkg'" in none.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "probe_pkg-3.0-py3-none-any.whl").write_text("not a zip archive")
    refused = run(broken)
    assert refused.stdout.splitlines() == ["/elsewhere"], refused.stdout
    assert "going on with the machine's packages" in refused.stderr


def test_the_cuda_tests_launch_nccl_before_they_compile_in_process():
    """The tests part (110 s) stops pytest where its time is up, and inductor's cold compilations are most
    of that time: the NCCL launch (torchrun, DDP, compiled, with accumulation), which no other part runs,
    comes before the in-process compilation, whose inductor path the cifar, step and e2e parts compile again."""
    tree = ast.parse((REPO / "tests" / "test_cuda.py").read_text())
    tests = [node.name for node in tree.body if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    nccl = tests.index("test_torchrun_one_process_nccl_compiled_with_accumulation_on_the_demo_data")
    assert nccl < tests.index("test_compiled_bf16_step_uses_flash_attention_and_matches_eager")


@pytest.mark.parametrize("opt_in", ["", "1"])
def test_the_suite_hides_the_gpus_unless_asked_and_the_tests_part_asks(tmp_path, opt_in):
    """tests/conftest.py hides a machine's GPUs from the suite (its forked ranks cannot start CUDA again once
    the pytest process has), unless MAE_TEST_CUDA=1; the tests part's pytest runs with it, or every CUDA test
    would skip on the GPU."""
    probe = (
        "import os, sys; sys.path.insert(0, 'tests'); import conftest; print(repr(os.environ['CUDA_VISIBLE_DEVICES']))"
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "3", "MAE_TEST_CUDA": opt_in}
    shown = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert shown.stdout.strip() == ("'3'" if opt_in else "''")
    log = tmp_path / "pytest.txt"
    status = run_pytest([sys.executable, "-c", "import os; print(os.environ.get('MAE_TEST_CUDA'))"], log, 60)
    assert status == 0 and log.read_text().splitlines()[-1] == "1"
