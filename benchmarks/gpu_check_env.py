"""gpu_check.sh part 1, the environment: versions, the GPU and its clocks, the bf16 matrix-product
peak that every MFU figure is divided by, the device-to-device copy rate, and whether torchvision
decodes a list of JPEGs on the GPU."""

import datetime
import os
import platform
import resource
import subprocess
from pathlib import Path

import numpy
import PIL
import timm
import torch
import torchvision
from torchvision.io import decode_jpeg, encode_jpeg

from benchmarks import gpu_check_official
from benchmarks.bench_pretrain import sync
from benchmarks.gpu_check_common import PartRecord, Sizes, gpu_identity, matmul_tflops, run_part, time_calls
from util.memory import SHARED_MEMORY

CLOCK_FIELDS = "clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw,pstate"
# Loader workers hand their batches over in /dev/shm: the loader and e2e parts' float pipelines hold up to 15
# workers x 2 batches of 256 x 3 x 224 x 224 float32 there (4.6 GB). Where it is smaller, the workers die of a
# bus error, and with them the official pipeline's row, the ratio the check is for; nobody has read its size on
# the device machines, which start bare and whose memory grows as it is used (the device tool's H200.md).
SHM = SHARED_MEMORY
SHM_NEEDED_GIB = 8
SHM_SIZE = "16G"  # a tmpfs's limit: its pages are taken only as they are written


def nvidia_smi(fields: str) -> dict[str, str]:
    """``nvidia-smi --query-gpu`` of the first GPU, as {field: value}; {} where there is none."""
    try:
        result = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"], capture_output=True, text=True, timeout=20
        )
    except (OSError, subprocess.TimeoutExpired):
        return {}
    lines = result.stdout.splitlines()
    if result.returncode or not lines:
        return {}
    return dict(zip(fields.split(","), lines[0].split(", "), strict=False))


def versions(device: torch.device) -> dict[str, object]:
    found: dict[str, object] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "cpu_cores": len(os.sched_getaffinity(0)),
        # Each tensor a loader worker hands over holds a file descriptor until taken: a limit to read when a
        # loader fails with 'received 0 items of ancdata' or 'Too many open files'.
        "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        "date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(),  # of the results' file name
    }
    found.update(gpu_identity(device))  # which GPU: an H100 and an H200 give different figures
    if device.type == "cuda":
        found.update(nvidia_smi("driver_version"))
    commit = Path(gpu_check_official.OFFICIAL_DIR, "COMMIT")
    found["official_commit"] = commit.read_text().strip() if commit.is_file() else None
    return found


def gib_of(path: str) -> float:
    stat = os.statvfs(path)
    return stat.f_blocks * stat.f_frsize / 2**30


def roomy_shm(path: str = SHM) -> dict[str, object]:
    """The size of ``path`` (/dev/shm), remounted at SHM_SIZE where it is under SHM_NEEDED_GIB and this process
    is root (the machine is bare and given back after the run); what was done, for ``versions``."""
    try:
        size = round(gib_of(path), 1)
    except OSError as error:
        return {"shm_gib": None, "shm_error": str(error)}
    if size >= SHM_NEEDED_GIB or os.geteuid() != 0:
        return {"shm_gib": size}
    try:
        result = subprocess.run(["mount", "-o", f"remount,size={SHM_SIZE}", path], capture_output=True, text=True)
    except OSError as error:  # no mount command: said, as a refused remount is, and the part goes on
        return {"shm_gib": size, "shm_error": str(error)[:200]}
    if result.returncode:
        return {"shm_gib": size, "shm_error": (result.stderr.strip() or f"mount: status {result.returncode}")[:200]}
    return {"shm_gib": round(gib_of(path), 1), "shm_gib_before_remount": size}


def copy_gb_s(device: torch.device, mib: int) -> float:
    """Device-to-device copy, bytes read plus bytes written per second."""
    src = torch.randn(mib * 2**18, device=device)  # 4-byte floats
    dst = torch.empty_like(src)
    seconds = sorted(time_calls(lambda: dst.copy_(src), device, warmup=3, repeats=10))[5]
    return 2 * src.numel() * 4 / seconds / 1e9


def decode_list_works(device: torch.device) -> bool:
    """``decode_jpeg(list, device=...)`` decodes two smooth JPEGs of different sizes to their pixels."""
    images = []
    for h, w in ((48, 64), (40, 30)):
        ramp = torch.linspace(0, 255, w).expand(h, w) * 0.5 + torch.linspace(0, 127, h)[:, None]
        images.append(torch.stack([ramp, ramp.flip(1), 255 - ramp]).to(torch.uint8))
    decoded = decode_jpeg([encode_jpeg(i, quality=95) for i in images], device=device)
    sync(device)  # nvJPEG decodes on a stream of its own: the whole device, before reading the pixels
    for got, want in zip(decoded, images, strict=True):
        if got.shape != want.shape or got.device.type != device.type:
            return False
        if (got.cpu().float() - want.float()).abs().mean() > 8:
            return False
    return True


def main(record: PartRecord, sizes: Sizes, device: torch.device) -> None:
    found = versions(device)
    if device.type == "cuda":  # not the CPU check's: it would remount this machine's
        found.update(roomy_shm())
    record.set("versions", found)
    if device.type == "cuda":
        record.set("clocks_idle", nvidia_smi(CLOCK_FIELDS))
    record.attempt("matmul", lambda: record.set("matmul_tflops", matmul_tflops(device, sizes.matmul_n)))
    if device.type == "cuda":
        record.set("clocks_after_matmul", nvidia_smi(CLOCK_FIELDS))
    record.attempt("copy", lambda: record.set("copy_gb_s", copy_gb_s(device, sizes.copy_mib)))
    record.set("decode_jpeg_list_on_device", record.attempt("decode_jpeg list", lambda: decode_list_works(device)))


if __name__ == "__main__":
    run_part("env", main)
