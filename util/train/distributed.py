"""torch.distributed set-up from torchrun's, SLURM's or OpenMPI's environment, and helpers.

Start-up is checked before anything waits (``launch_env.read_world``: a ``World`` or a one-line error naming
the variable). The processes then meet for at most ``MAE_DIST_START_TIMEOUT`` seconds (default
300), saying after a few what they wait for; collectives during training keep a long timeout.
The launcher's environment is read in ``launch_env``, each rank's GPU chosen and checked in ``gpus``;
``waiting`` lets ranks wait for other ranks' work longer than a collective would.
"""

import contextlib
import datetime
import gc
import os
import socket
import sys
import threading
import time
from argparse import Namespace
from collections.abc import Callable, Mapping

import torch
import torch.distributed as dist

from util.cli.errors import UserError, fail, first_line
from util.cli.log import set_rank
from util.train import gpus, launch_env

NOTICE_AFTER_S = 5.0  # a healthy start-up is usually quicker: say nothing before
# Long enough for what one rank does while the others wait at the next collective (rank 0 writes a
# checkpoint or a picture); NCCL's watchdog aborts a process stuck longer than this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# What gloo says when a peer's connection breaks (its errors are plain RuntimeErrors).
_PEER_LOST_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")
# The rendezvous store this process joined its group through (join); util.train.waiting meets on it (rendezvous_store).
_store: dist.Store | None = None


def generation_store(store: dist.Store, env: Mapping[str, str]) -> dist.Store:
    """``store`` with keys of this start alone where one torchrun restarts its processes: its store outlives
    them, and a restarted rank read a dead one's address there before its successor wrote its own, so that
    gloo could not connect ('connectFullMesh failed ... Connection refused'; 3 of 6 restarts of 2 processes,
    and 4 of 6 of a ten-line torch script; 0 of 6 with a key prefix per restart). Not across nodes: a node
    restarted because another's processes failed does not count it, and ranks would wait on other keys."""
    restarts = launch_env.env_count(env, "TORCHELASTIC_RESTART_COUNT")
    if not restarts or env.get("GROUP_WORLD_SIZE") != "1":
        return store
    return dist.PrefixStore(f"restart_{restarts}", store)


def init_distributed_mode(args: Namespace) -> None:
    """Fill ``args.rank, args.world_size, args.gpu, args.distributed`` and join the process group
    (NCCL on GPUs, gloo on CPU); without a launcher the run is a single process."""
    world = launch_env.read_world(os.environ, args.dist_url, args.dist_on_itp)
    if world is None:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        gpus.use_named_gpu(args.device)
        set_rank(0, distributed=False)
        return
    seconds = launch_env.start_timeout(os.environ)  # checked before anything waits
    args.rank, args.world_size, args.gpu, args.distributed = world.rank, world.size, world.local_rank, True
    use_cuda = str(args.device).startswith("cuda")
    device = gpu = None
    if use_cuda:
        args.gpu = gpus.gpu_of(world)
        device = torch.device("cuda", args.gpu)
        # Before the process group: NCCL's collectives, object collectives included, run on the current device.
        torch.cuda.set_device(device)
        args.device = str(device)
        gpu = gpus.gpu_identity(device)
    join(world, "nccl" if use_cuda else "gloo", seconds, device, gpu)
    set_rank(args.rank, distributed=True)


def join(
    world: launch_env.World, backend: str, seconds: float, device: torch.device | None = None, gpu: str | None = None
) -> None:
    """Meet the other processes (waiting at most ``seconds``, saying so after a few) and start the
    default process group, whose collectives then time out after ``COLLECTIVE_TIMEOUT``. ``device``: the
    rank's GPU under NCCL, where the group's first collective, a barrier, runs; ``gpu``: its
    ``gpus.gpu_identity``, which no other rank may share (not checked where None)."""
    waiting = f"rank {world.rank} of {world.size}"
    advice = (
        f"start all {world.size} processes with the same rendezvous address (a free port), or wait longer "
        f"with {launch_env.START_TIMEOUT_VAR}=SECONDS"
    )
    notice_text = (
        f"{waiting}: waiting for the job's other processes at {world.where} "
        f"(giving up after {seconds:g} s; {launch_env.START_TIMEOUT_VAR} sets it)\n"
    )
    notice = threading.Timer(min(NOTICE_AFTER_S, seconds / 2), lambda: sys.stderr.write(notice_text))
    notice.daemon = True
    notice.start()
    deadline = time.monotonic() + seconds

    def time_left() -> datetime.timedelta:
        return datetime.timedelta(seconds=max(deadline - time.monotonic(), 1.0))

    try:
        if world.rank > 0 and world.listener:
            # Polled here, not by torch's client, which logs a C++ stack trace on every retry.
            _wait_for_listener(world.listener, deadline, f"{waiting}: {world.where}", advice)
        store, _, _ = next(dist.rendezvous(world.init_method, world.rank, world.size, timeout=time_left()))
        store = generation_store(store, os.environ)
        if gpu is not None:
            store.set_timeout(time_left())
            gpus.refuse_shared_gpu(store, world, gpu)
    except dist.DistError as e:  # rank 0: the others did not come, or its port is taken
        reason = first_line(e).rstrip(".")
        fail(f"{waiting}: could not meet the job's other processes at {world.where} ({reason}); {advice}")
    finally:
        notice.cancel()
    store.set_timeout(COLLECTIVE_TIMEOUT)
    global _store
    _store = store
    dist.init_process_group(backend, store=store, rank=world.rank, world_size=world.size, timeout=COLLECTIVE_TIMEOUT)
    # NCCL's barrier is an all-reduce on a GPU: named here, else torch 2.6 takes GPU rank % GPUs and torch 2.14
    # the current one with a warning. Not init_process_group(device_id=): that also starts NCCL eagerly, which
    # torch 2.6 and 2.7.0 do in NCCL's non-blocking mode, where NCCL 2.26 (torch 2.7.0's) hangs at random
    # (pytorch/pytorch#153960, worked around in 2.7.1).
    dist.barrier(device_ids=None if device is None else [device.index])


def _wait_for_listener(address: tuple[str, int], deadline: float, what: str, advice: str) -> None:
    """Return once something accepts connections at ``address`` (rank 0's store), or fail at ``deadline``."""
    while True:
        try:
            socket.create_connection(address, timeout=1).close()
            return
        except socket.gaierror as e:
            fail(f"{what}: the host {address[0]} is unknown ({e.strerror}); check MASTER_ADDR or --dist_url")
        except OSError:
            if time.monotonic() >= deadline:
                fail(f"{what}: nothing listens there (rank 0 has not started); {advice}")
            time.sleep(0.25)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def is_main_process() -> bool:
    return rank() == 0


def rendezvous_store() -> dist.Store | None:
    """The store this process met its group through (``join``); None before that, after ``cleanup``, or in a
    group started without ``join``."""
    return _store


def from_main(value: object) -> object:
    """Rank 0's ``value`` (any picklable object) on every rank: what rank 0 alone decides."""
    if not is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value: object) -> list:
    """Every rank's ``value`` (any picklable object), in rank order, on every rank."""
    if not is_dist():
        return [value]
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    return values


def on_rank_0_for_every_rank(check: Callable[[], None]) -> None:
    """``check()`` on rank 0, whose refusal (a ``UserError``) stops every rank with its line. Left to rank 0
    alone, the other ranks went on to their next collective and ended in a traceback once it exited (gloo's
    'Connection closed by peer'), or, with NCCL, waited for its watchdog unless a launcher stopped them.
    A collective, so also a barrier: the other ranks go on once rank 0 has checked."""
    refusal = None
    if is_main_process():
        try:
            check()
        except UserError as e:
            refusal = e
    message = from_main(None if refusal is None else str(refusal))
    if refusal is not None:
        raise refusal
    if message is not None:
        fail(str(message))


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
    """Destroy the process group, once the caller has dropped its DDP wrapper. DDP sits in a
    reference cycle: collected after this, its reducer would hold the last reference to the group,
    whose gloo destructor joins its threads holding the GIL while one of them waits for the GIL to
    free the last collective's tensor (a hang at the end of 2-rank CPU runs, seen with torch 2.11)."""
    global _store
    _store = None
    if is_dist():
        gc.collect()
        dist.destroy_process_group()


def cleanup_before_exit() -> None:
    """``cleanup()`` for a process on its way out after a stop or an error, called outside the
    ``except`` clause (whose traceback holds the frames that hold the DDP wrapper). A group that
    cannot be destroyed cleanly changes nothing then: its error must not replace the exit status."""
    with contextlib.suppress(Exception):
        cleanup()


def peer_stopped(error: BaseException) -> bool:
    """Whether ``error`` says that another process of this job went away (killed, crashed), as a
    collective or DDP's gradient all-reduce finds out; only meaningful in a distributed run."""
    lost = isinstance(error, RuntimeError) and any(m in str(error) for m in _PEER_LOST_MARKERS)
    return is_dist() and (isinstance(error, dist.DistError) or lost)


def peer_stopped_message(advice: str = "") -> str:
    """The one line a process says when ``peer_stopped``: what happened and how to continue (``advice``; by
    default a training job's)."""
    restarts, most = (
        launch_env.env_count(os.environ, f"TORCHELASTIC_{name}") for name in ("RESTART_COUNT", "MAX_RESTARTS")
    )
    if not advice and restarts < most:  # torchrun --max-restarts: it starts the job again by itself (run.start)
        # Not "restart k of N": a node restarted because another node failed does not count it.
        advice = f"torchrun restarts the job while restarts are left (--max-restarts {most}), from its last checkpoint"
    advice = advice or "restart the whole job with --resume auto to continue from its last checkpoint"
    return f"another process of this job stopped, so rank {rank()} of {world_size()} cannot go on; {advice}"
