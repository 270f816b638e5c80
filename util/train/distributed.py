"""torch.distributed set-up from torchrun's, SLURM's or OpenMPI's environment, and helpers."""

import datetime
import os
from argparse import Namespace

import torch
import torch.distributed as dist

from util.cli.log import set_rank


def init_distributed_mode(args: Namespace) -> None:
    """Fill ``args.rank, args.world_size, args.gpu, args.distributed`` and join the process group.

    The rank comes from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), OpenMPI (``--dist_on_itp``) or
    SLURM (SLURM_PROCID, one task per GPU). Without any of them the run is a single process.
    NCCL is used on GPUs, gloo on CPU.
    """
    if args.dist_on_itp:
        env = _require(
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            flag="--dist_on_itp",
        )
        args.rank, args.world_size = int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
        args.gpu = int(env["OMPI_COMM_WORLD_LOCAL_RANK"])
        args.dist_url = f"tcp://{env['MASTER_ADDR']}:{env['MASTER_PORT']}"
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        args.rank = int(os.environ["RANK"])
        args.world_size = int(os.environ["WORLD_SIZE"])
        args.gpu = int(os.environ.get("LOCAL_RANK", 0))
    elif "SLURM_STEP_ID" in os.environ and int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # Launched by srun, one task per GPU (a plain `python` inside an allocation is not).
        args.rank = int(os.environ["SLURM_PROCID"])
        args.world_size = int(os.environ["SLURM_STEP_NUM_TASKS"])
        args.gpu = int(os.environ.get("SLURM_LOCALID", 0))
        if args.dist_url == "env://":
            _require("MASTER_ADDR", "MASTER_PORT", flag="srun (export them, or give --dist_url tcp://HOST:PORT)")
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        set_rank(0, distributed=False)
        return

    args.distributed = True
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
        args.device = f"cuda:{args.gpu}"
    backend = "nccl" if use_cuda else "gloo"
    # torchrun sets MASTER_ADDR/PORT and "env://" reads them; --dist_url overrides.
    dist.init_process_group(
        backend=backend,
        init_method=args.dist_url,
        world_size=args.world_size,
        rank=args.rank,
        timeout=datetime.timedelta(minutes=30),
    )
    dist.barrier()
    set_rank(args.rank, distributed=True)


def _require(*names: str, flag: str) -> dict[str, str]:
    missing = [n for n in names if n not in os.environ]
    if missing:
        from util.cli.errors import fail

        fail(f"{flag} needs the environment variables {', '.join(missing)}, which are not set")
    return {n: os.environ[n] for n in names}


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return rank() == 0


def all_reduce_sum(values: list[float], device: torch.device | str) -> list[float]:
    """Sum a few numbers over all ranks (one collective)."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def any_rank(flag: bool, device: torch.device | str) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    return all_reduce_sum([float(flag)], device)[0] > 0


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
