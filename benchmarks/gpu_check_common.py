"""What the parts of gpu_check.sh share: their sizes (on the GPU and at toy size on a CPU), the
record each part keeps of its results, and how a part runs.

Each part is a module run as ``python -m benchmarks.gpu_check_<part> --work DIR [--cpu]``. It
writes ``DIR/<part>.json`` anew after every result (so that a part stopped by its timeout keeps
what it measured) and records its own errors there; gpu_check_summary.py merges the parts.
"""

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_pretrain import sync
from util.atomic import atomic_write
from util.train.precision import fast_cuda_math

REPO = Path(__file__).resolve().parents[1]
FAIL_ENV = "GPU_CHECK_FAIL"  # a part named here crashes at its start: checks that the others carry on
DEADLINE_ENV = "GPU_CHECK_PART_DEADLINE"  # gpu_check.sh: when (epoch seconds) the part's timeout kills it


@dataclass(frozen=True)
class Sizes:
    step_models: tuple[str, ...]
    input_size: int  # of the training step and the end-to-end runs
    batch: int
    steps: int  # timed, per impl
    warmup: int
    largest_batch_model: str | None  # the model whose largest batch that fits is measured too
    matmul_n: int
    copy_mib: int
    loader_size: int  # crops of the loader part
    workers: int
    loader_images: int  # per loader measurement
    e2e_model: str
    e2e_steps: int
    e2e_warmup: int
    precision: str  # ours; the official step as shipped is fp16 autocast (off without CUDA)
    # The CIFAR-10 study's (recipes/cifar10_gpu): its pre-training and fine-tuning steps, and the
    # memory loader over as many synthetic images as CIFAR-10 has, alone and feeding the step.
    cifar_model: str
    cifar_size: int
    cifar_batch: int
    cifar_ft_model: str
    cifar_ft_batch: int
    cifar_images: int


GPU = Sizes(
    step_models=("mae_vit_base_patch16", "mae_vit_large_patch16"),
    input_size=224,
    batch=256,
    steps=20,
    warmup=3,
    largest_batch_model="mae_vit_base_patch16",
    matmul_n=8192,
    copy_mib=2048,
    loader_size=224,
    workers=15,  # the 16 cores less the main process
    loader_images=8192,
    e2e_model="mae_vit_base_patch16",
    e2e_steps=24,
    e2e_warmup=6,
    precision="bf16",
    cifar_model="mae_vit_tiny_patch2",
    cifar_size=32,
    cifar_batch=1024,
    cifar_ft_model="vit_tiny_patch2",
    cifar_ft_batch=512,
    cifar_images=50_000,
)
# Toy sizes for a CPU: every code path of the GPU run, in seconds.
CPU = Sizes(
    step_models=("mae_vit_mini_patch4",),
    input_size=32,
    batch=8,
    steps=3,
    warmup=1,
    largest_batch_model=None,
    matmul_n=256,
    copy_mib=16,
    loader_size=32,
    workers=2,
    loader_images=64,
    e2e_model="mae_vit_mini_patch4",
    e2e_steps=3,
    e2e_warmup=1,
    precision="fp32",
    cifar_model="mae_vit_mini_patch4",
    cifar_size=32,
    cifar_batch=8,
    cifar_ft_model="vit_mini_patch4",
    cifar_ft_batch=8,
    cifar_images=64,
)


@dataclass
class PartRecord:
    """A part's results: ``values`` (named readings), ``rows`` (per table) and ``errors`` (one line each)."""

    part: str
    path: Path
    values: dict[str, Any] = field(default_factory=dict)
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def set(self, key: str, value: Any) -> None:
        self.values[key] = value
        self.save()

    def row(self, table: str, row: dict[str, Any]) -> None:
        self.rows.setdefault(table, []).append(row)
        print(f"{table}: {json.dumps(row)}", flush=True)
        self.save()

    def error(self, message: str) -> None:
        line = " ".join(f"{self.part}: {message}".split())  # one line
        self.errors.append(line)
        print(f"error: {line}", flush=True)
        self.save()

    def save(self) -> None:
        data = {"part": self.part, "values": self.values, "rows": self.rows, "errors": self.errors}
        atomic_write(str(self.path), lambda f: f.write(json.dumps(data, indent=1).encode()))

    def attempt(self, what: str, body: Callable[[], Any]) -> Any:
        """``body()``, or None with its error recorded (``what`` names it): one failure never stops the rest."""
        try:
            return body()
        except Exception as e:  # noqa: BLE001 - any failure is a finding to report, not a reason to stop
            traceback.print_exc()
            self.error(f"{what}: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
            return None


def run_part(part: str, body: Callable[[PartRecord, Sizes, torch.device], None]) -> None:
    """Parse ``--work`` and ``--cpu``, then ``body(record, sizes, device)``; a crash is recorded and exits 1."""
    p = argparse.ArgumentParser(f"gpu_check part {part}")
    p.add_argument("--work", required=True, help="folder of the parts' records")
    p.add_argument("--cpu", action="store_true", help="toy sizes on the CPU")
    args = p.parse_args()
    record = PartRecord(part, Path(args.work) / f"{part}.json")
    record.save()
    sizes, device = (CPU, torch.device("cpu")) if args.cpu else (GPU, torch.device("cuda"))
    started = time.perf_counter()
    ok = record.attempt("crashed", lambda: _run(part, body, record, sizes, device)) is not None
    print(f"{part}: {time.perf_counter() - started:.1f} s", flush=True)
    raise SystemExit(0 if ok else 1)


def _run(part: str, body: Callable, record: PartRecord, sizes: Sizes, device: torch.device) -> bool:
    if os.environ.get(FAIL_ENV) == part:
        raise RuntimeError(f"forced failure ({FAIL_ENV}={part})")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA is not available; run with --cpu for the toy sizes on a CPU")
    # Every part says which GPU it ran on: a part rerun without env (the device tool may give an H100 or an
    # H200) still files its figures under the GPU that made them.
    record.values.update(gpu_identity(device))
    record.save()
    body(record, sizes, device)
    return True


def gpu_identity(device: torch.device) -> dict[str, Any]:
    """The GPU's name (``NVIDIA H100 80GB HBM3``, ``NVIDIA H200``), compute capability and total memory in GiB;
    {} on a CPU."""
    if device.type != "cuda":
        return {}
    props = torch.cuda.get_device_properties(device)
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "gpu_memory_gib": props.total_memory / 2**30,
    }


def seconds_left() -> float | None:
    """Seconds until gpu_check.sh's timeout kills this part (None when run on its own)."""
    deadline = os.environ.get(DEADLINE_ENV)
    return float(deadline) - time.time() if deadline else None


def time_for(record: PartRecord, what: str, seconds: float) -> bool:
    """Whether ``seconds`` are left for ``what``; if not, it is left out (saying so), and the time goes to
    the parts after this one rather than to a measurement the timeout would cut short."""
    left = seconds_left()
    if left is None or left >= seconds:
        return True
    record.error(f"{what}: left out, {left:.0f} s left of the part's time and it needs about {seconds}")
    return False


def as_in_training(device: torch.device) -> None:
    """cuDNN's autotuning and TF32, as training sets them on a GPU (the official main_pretrain.py
    autotunes too)."""
    if device.type == "cuda":
        fast_cuda_math()


def matmul_tflops(device: torch.device, n: int) -> float:
    """Dense matrix product rate on random data (zeros run faster), median of 10 after 3 warm-ups:
    bf16 on a GPU (the peak MFU is relative to), fp32 on a CPU (bf16 is emulated on most)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    times = time_calls(lambda: a @ b, device, warmup=3, repeats=10)
    return 2 * n**3 / statistics.median(times) / 1e12


def time_calls(call: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls after ``warmup``: CUDA events on a GPU, the host clock on a CPU."""
    for _ in range(warmup):
        call()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            call()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            call()
            times.append(time.perf_counter() - begin)
    return times


def data_path(sizes: Sizes) -> str:
    """The list file of the JPEG subset (make_jpeg_subset.py); at toy sizes, the demo split where it is missing."""
    subset = REPO / "benchmarks" / "jpeg_subset" / "train.txt"
    if subset.is_file() or sizes is GPU:
        return str(subset)
    return str(REPO / "demo" / "cifar10-2k-split" / "train.txt")


def image_folder(sizes: Sizes) -> str:
    """The same images as ``data_path``, as an ImageFolder root (the official pipeline's layout)."""
    subset = REPO / "benchmarks" / "jpeg_subset" / "images"
    if subset.is_dir() or sizes is GPU:
        return str(subset)
    return str(REPO / "demo" / "cifar10-2k")
