"""Memory, sized before it is allocated: a run that cannot fit stops in one line that names the
flags to change, instead of being killed by the kernel (or CUDA) minutes later."""

import os

import torch

from util.cli.errors import fail


def available_bytes(device: str | torch.device = "cpu") -> int:
    """Memory a new allocation can take now: free GPU memory on CUDA, else the kernel's
    MemAvailable (what can be allocated without swapping), else total physical memory."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def require(nbytes: float, what: str, advice: str, device: str | torch.device = "cpu") -> None:
    """Fail in one line unless ``nbytes`` fit in the memory of ``device`` now.

    ``what`` names the allocation (``"the (1, 3137, 192) position embedding of --input_size 224"``),
    ``advice`` the flags to change."""
    free = available_bytes(device)
    if nbytes > free:
        where = "GPU" if torch.device(device).type == "cuda" else "CPU"
        fail(f"{what} needs about {_gib(nbytes)}, {where} memory has {_gib(free)} free; {advice}")


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB" if nbytes >= 2**27 else f"{nbytes / 2**20:.0f} MiB"
