"""Which GPU each rank of a job uses: its local rank's, or the only one it sees; refused in one line
where there is none for it, or where two ranks are on one GPU (checked through the rendezvous store)."""

import socket

import torch
import torch.distributed as dist

from util.cli.errors import fail, listed_ranks
from util.train.launch_env import World


def use_named_gpu(device: str) -> None:
    """Make a single process's ``--device cuda:N`` the current CUDA device. What torch takes from the current
    device where none is named (the CUDA random state a checkpoint saves and resume restores, the loader's
    pinned memory, is_bf16_supported) is then the GPU that trains, not GPU 0."""
    parsed = torch.device(device)
    if parsed.type == "cuda" and parsed.index is not None:
        torch.cuda.set_device(parsed)


def gpu_of(world: World) -> int:
    """The GPU index of ``world``'s process on its node: its local rank, or the only GPU it sees, whatever
    its local rank (srun --gpus-per-task=1 gives each task one). Whether that GPU is another rank's too
    (srun --gres=gpu:1 gives each task the same one) is for ``refuse_shared_gpu`` to find."""
    count = torch.cuda.device_count()
    if world.local_rank < count:
        return world.local_rank
    if count == 1:
        return 0
    fail(f"local rank {world.local_rank} has no GPU: this node has {count}; start {count} process(es) per node")


def gpu_identity(device: torch.device) -> str:
    """Which GPU ``device`` is, as every process that sees it names it, whatever CUDA_VISIBLE_DEVICES
    numbers it: its UUID and host."""
    return f"GPU {torch.cuda.get_device_properties(device).uuid} on host {socket.gethostname()}"


SHARED_GPU_KEYS = "mae_shared_gpu"  # the prefix of refuse_shared_gpu's keys, apart from torch's own


def refuse_shared_gpu(store: dist.Store, world: World, gpu: str) -> None:
    """Stop every rank with the same line where two or more ranks are on one GPU (``gpu``: this rank's,
    from ``gpu_identity``); NCCL would refuse them ("Duplicate GPU detected") or hang, and each rank said
    that another had stopped. A few operations on the rendezvous ``store`` per rank, whatever the world
    size: the last rank to come tells every rank the outcome."""
    keys = dist.PrefixStore(SHARED_GPU_KEYS, store)
    keys.append(f"ranks on {gpu}", f"{world.rank} ")
    if keys.add(f"count on {gpu}", 1) == 2:
        keys.set("shared", gpu)
    if keys.add("arrived", 1) == world.size:
        keys.set("outcome", _shared_gpu_refusal(keys, world.size))
    refusal = keys.get("outcome").decode()  # waits for the last rank, until the store's timeout
    if refusal:
        # Rank 0 serves the store (torchrun's agent aside): it leaves last, else a rank still reading finds it gone.
        if keys.add("read", 1) == world.size:
            keys.set("all read", "")
        if world.rank == 0:
            keys.wait(["all read"])
        fail(refusal)


def _shared_gpu_refusal(keys: dist.Store, size: int) -> str:
    """The line that stops every rank where a GPU is shared (one of them, if several), else ''."""
    if not keys.check(["shared"]):
        return ""
    gpu = keys.get("shared").decode()
    ranks = sorted(int(r) for r in keys.get(f"ranks on {gpu}").split())
    return (
        f"ranks {listed_ranks(ranks)} of {size} share one GPU ({gpu}), and NCCL needs one per process: give each "
        "process its own (srun: --ntasks-per-node equal to the GPUs per node, or --gpus-per-task=1), or start "
        "fewer (torchrun: --nproc_per_node at most the GPUs per node)"
    )
