"""torch.distributed set-up from torchrun's, SLURM's or OpenMPI's environment, and helpers.

Start-up is checked before anything waits (``read_world``: a ``World`` or a one-line error naming
the variable). The processes then meet for at most ``MAE_DIST_START_TIMEOUT`` seconds (default
300), saying after a few what they wait for; collectives during training keep a long timeout.
"""

import contextlib
import datetime
import gc
import os
import socket
import sys
import threading
import time
import uuid
from argparse import Namespace
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urlsplit

import torch
import torch.distributed as dist

from util.cli.errors import UserError, fail, first_line
from util.cli.log import set_rank
from util.cli.redact import redacted

START_TIMEOUT_VAR = "MAE_DIST_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 300.0
NOTICE_AFTER_S = 5.0  # a healthy start-up is usually quicker: say nothing before
# Long enough for what one rank does while the others wait at the next collective (rank 0 writes a
# checkpoint or a picture); NCCL's watchdog aborts a process stuck longer than this.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)
# What gloo says when a peer's connection breaks (its errors are plain RuntimeErrors).
_PEER_LOST_MARKERS = ("gloo/transport", "Connection reset by peer", "Connection closed by peer")
# The rendezvous store this process joined its group through (join); work_while_others_wait meets on it.
_store: dist.Store | None = None


@dataclass(frozen=True)
class World:
    """Where this process stands in a distributed job, as its launcher's environment says."""

    rank: int
    size: int
    local_rank: int
    init_method: str  # env://, tcp://HOST:PORT or file://PATH
    where: str  # the rendezvous address, for messages
    listener: tuple[str, int] | None  # (host, port) rank 0 listens on; None for file://


def _number(text: str, kind: type[int] | type[float]) -> int | float | None:
    """``kind(text)``, or None where ``text`` is not such a number."""
    try:
        return kind(text)
    except ValueError:
        return None


def _whole_number(env: Mapping[str, str], name: str, minimum: int, default: str | None = None) -> int:
    text = env.get(name, default)
    if text is None:
        fail(f"the environment variable {name} is not set; the launcher sets it (torchrun, srun, mpirun), or export it")
    value = _number(text, int)
    if value is None or value < minimum:
        fail(f"the environment variable {name}={text!r} must be a whole number, at least {minimum}")
    return value


def _launcher_ranks(env: Mapping[str, str], dist_on_itp: bool) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from whichever launcher started us; None: a single process."""
    if dist_on_itp:  # OpenMPI's mpirun
        names = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")
    elif "RANK" in env or "WORLD_SIZE" in env:  # torchrun sets both; one alone is a mistake
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    elif "SLURM_STEP_ID" in env and _whole_number(env, "SLURM_STEP_NUM_TASKS", 1, "1") > 1:
        # Launched by srun, one task per GPU (a plain `python` inside an allocation is not).
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    else:
        return None
    rank_name, size_name, local_name = names
    size = _whole_number(env, size_name, 1)
    rank = _whole_number(env, rank_name, 0)
    if rank >= size:
        fail(f"{rank_name}={rank} is not below {size_name}={size}: the ranks of a job run from 0 to {size - 1}")
    return rank, size, _whole_number(env, local_name, 0, None if dist_on_itp else "0")


def _rendezvous(env: Mapping[str, str], dist_url: str, dist_on_itp: bool) -> tuple[str, tuple[str, int] | None]:
    """(init method, rank 0's host and port), checked: the variables or the URL the processes meet at."""
    if dist_on_itp or dist_url == "env://":
        flag = "--dist_on_itp" if dist_on_itp else "--dist_url env://"
        missing = [n for n in ("MASTER_ADDR", "MASTER_PORT") if not env.get(n)]
        if missing:
            fail(
                f"{flag} needs the environment variable(s) {', '.join(missing)} (where rank 0 listens); "
                "export them, or give --dist_url tcp://HOST:PORT"
            )
        host, port = env["MASTER_ADDR"], _port(env["MASTER_PORT"], "the environment variable MASTER_PORT")
        return (f"tcp://{host}:{port}" if dist_on_itp else "env://"), (host, port)
    url = urlsplit(dist_url)
    if url.scheme == "tcp":
        try:
            port = url.port
        except ValueError:  # not a number, or beyond 65535
            port = None
        if not url.hostname or not port:
            fail(f"--dist_url {dist_url} needs a host and a port from 1 to 65535: tcp://HOST:PORT")
        return dist_url, (url.hostname, port)
    if url.scheme == "file" and url.path:
        return dist_url, None
    fail(f"--dist_url {dist_url} is not understood; give env://, tcp://HOST:PORT or file:///shared/path")


def _port(text: object, what: str) -> int:
    port = _number(str(text), int)
    if port is None or not 0 < port < 65536:
        fail(f"{what}: the port {text} must be a whole number from 1 to 65535")
    return port


def read_world(env: Mapping[str, str], dist_url: str = "env://", dist_on_itp: bool = False) -> World | None:
    """This process's place in a distributed job, from torchrun's, srun's or (``--dist_on_itp``)
    OpenMPI's environment; None for a single process. Impossible values are a one-line error
    naming the variable: left to torch they hang or end in a traceback."""
    ranks = _launcher_ranks(env, dist_on_itp)
    if ranks is None:
        return None
    init_method, listener = _rendezvous(env, dist_url, dist_on_itp)
    where = f"{listener[0]}:{listener[1]}" if listener else dist_url
    return World(*ranks, init_method=init_method, where=where, listener=listener)


def start_timeout(env: Mapping[str, str]) -> float:
    """Seconds the processes wait for each other at start-up (``MAE_DIST_START_TIMEOUT``)."""
    text = env.get(START_TIMEOUT_VAR, str(DEFAULT_START_TIMEOUT_S))
    seconds = _number(text, float)
    if seconds is None or not 0 < seconds < float("inf"):
        fail(f"the environment variable {START_TIMEOUT_VAR}={text!r} must be a positive number of seconds")
    return seconds


def env_count(env: Mapping[str, str], name: str, default: int = 0, minimum: int = 0) -> int:
    """A launcher's count ``name`` in ``env`` (restarts, most restarts, processes of a node): ``default``
    where it is unset, empty, not a whole number or under ``minimum``. Never an error: a launcher sets
    these, and where one is odd the run goes on as without it."""
    value = _number(env.get(name, ""), int)
    return default if value is None or value < minimum else value


def generation_store(store: dist.Store, env: Mapping[str, str]) -> dist.Store:
    """``store`` with keys of this start alone where one torchrun restarts its processes: its store outlives
    them, and a restarted rank read a dead one's address there before its successor wrote its own, so that
    gloo could not connect ('connectFullMesh failed ... Connection refused'; 3 of 6 restarts of 2 processes,
    and 4 of 6 of a ten-line torch script; 0 of 6 with a key prefix per restart). Not across nodes: a node
    restarted because another's processes failed does not count it, and ranks would wait on other keys."""
    restarts = env_count(env, "TORCHELASTIC_RESTART_COUNT")
    if not restarts or env.get("GROUP_WORLD_SIZE") != "1":
        return store
    return dist.PrefixStore(f"restart_{restarts}", store)


def launcher_restarts(env: Mapping[str, str]) -> int:
    """How many times a launcher started this job's processes again with the same command: torchrun
    (``--max-restarts``, once a process failed; its ``TORCHELASTIC_RESTART_COUNT``) or SLURM (a requeued
    job: preemption, a node failure, ``scontrol requeue``; its ``SLURM_RESTART_COUNT``). 0 on a first start."""
    return max(env_count(env, name) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))


def init_distributed_mode(args: Namespace) -> None:
    """Fill ``args.rank, args.world_size, args.gpu, args.distributed`` and join the process group
    (NCCL on GPUs, gloo on CPU); without a launcher the run is a single process."""
    world = read_world(os.environ, args.dist_url, args.dist_on_itp)
    if world is None:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        use_named_gpu(args.device)
        set_rank(0, distributed=False)
        return
    seconds = start_timeout(os.environ)  # checked before anything waits
    args.rank, args.world_size, args.gpu, args.distributed = world.rank, world.size, world.local_rank, True
    use_cuda = str(args.device).startswith("cuda")
    device = gpu = None
    if use_cuda:
        args.gpu = gpu_of(world)
        device = torch.device("cuda", args.gpu)
        # Before the process group: NCCL's collectives, object collectives included, run on the current device.
        torch.cuda.set_device(device)
        args.device = str(device)
        gpu = gpu_identity(device)
    join(world, "nccl" if use_cuda else "gloo", seconds, device, gpu)
    set_rank(args.rank, distributed=True)


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


def join(
    world: World, backend: str, seconds: float, device: torch.device | None = None, gpu: str | None = None
) -> None:
    """Meet the other processes (waiting at most ``seconds``, saying so after a few) and start the
    default process group, whose collectives then time out after ``COLLECTIVE_TIMEOUT``. ``device``: the
    rank's GPU under NCCL, where the group's first collective, a barrier, runs; ``gpu``: its
    ``gpu_identity``, which no other rank may share (not checked where None)."""
    waiting = f"rank {world.rank} of {world.size}"
    advice = (
        f"start all {world.size} processes with the same rendezvous address (a free port), or wait longer "
        f"with {START_TIMEOUT_VAR}=SECONDS"
    )
    notice_text = (
        f"{waiting}: waiting for the job's other processes at {world.where} "
        f"(giving up after {seconds:g} s; {START_TIMEOUT_VAR} sets it)\n"
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
            refuse_shared_gpu(store, world, gpu)
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


def listed_ranks(ranks: list[int]) -> str:
    """Ranks as messages name them: '0, 2, 3'."""
    return ", ".join(map(str, ranks))


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


T = TypeVar("T")
WAIT_KEYS = "mae_wait"  # the prefix of work_while_others_wait's keys in the store
WAIT_NOTICE_EVERY_S = 60.0  # how often the waiting ranks say what they wait for (the first after NOTICE_AFTER_S)


def work_while_others_wait(
    workers: Collection[int],
    work: Callable[[], T],
    progress: Callable[[], int],
    what: str,
    shown: Callable[[int], str] = str,
) -> T | None:
    """``work()`` on the ranks ``workers`` (its result there; None on the others) while the others wait
    for them as long as they get on, not for a collective's fixed ``COLLECTIVE_TIMEOUT``: a download of
    gigabytes at a slow link outlasts it, and the waiting ranks ended in a collective's timeout while
    the downloader was healthy. ``progress()``: a count that grows while a worker gets on (bytes
    downloaded), which it publishes in the rendezvous store every few seconds; the others give up,
    with one line, once the workers' count has not grown for ``COLLECTIVE_TIMEOUT`` (a worker killed,
    or stuck). Meanwhile the lowest waiting rank says every minute or so that it waits for them to
    ``what`` (a verb's phrase: 'download URL') and how far they got, as ``shown`` writes the count.
    Starts with a collective on every rank (rank 0 names the call's keys); does not end with one: the
    caller's next collective waits for the workers."""
    if not is_dist() or _store is None:  # a group started without join(): no store to meet on
        return work() if rank() in workers else None
    # Keys of this call alone, named by rank 0 at random (a short collective before the work): torchrun's store
    # outlives the processes it restarts, unprefixed across nodes (generation_store), and the "done" an earlier
    # attempt's wait left ended this one at once, into a collective that timed out during the download.
    keys = dist.PrefixStore(f"{WAIT_KEYS}/{from_main(uuid.uuid4().hex if is_main_process() else None)}", _store)
    stall_s = COLLECTIVE_TIMEOUT.total_seconds()
    if rank() in workers:
        return _work_publishing(keys, work, progress, min(5.0, stall_s / 4))
    _wait_for_workers(keys, sorted(workers), stall_s, what, shown)
    return None


def _work_publishing(keys: dist.Store, work: Callable[[], T], progress: Callable[[], int], every_s: float) -> T:
    """``work()``, adding how far ``progress()`` got since it started to the store's "progress" every
    ``every_s`` seconds (a count of all workers: a stuck one among several shows once the others finish),
    and "done" once it ends, failed or not: the waiting ranks then meet the caller's next collective,
    which carries its outcome."""
    stop, start = threading.Event(), progress()
    published = 0

    def publish() -> None:
        nonlocal published
        grown = max(progress() - start, published)  # never less: the count of all workers only grows
        keys.add("progress", grown - published)
        published = grown

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a store gone: the main thread finds out at its next collective
                publish()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join()
        keys.add("done", 1)


def _wait_for_workers(
    keys: dist.Store, workers: list[int], stall_s: float, what: str, shown: Callable[[int], str]
) -> None:
    """Poll the store until every one of ``workers`` is done; fail once their progress has not grown
    for ``stall_s`` seconds. A store that cannot be reached (rank 0's process, which serves it outside
    torchrun, stopped) raises the DistError that says another process stopped."""
    poll_s = min(1.0, stall_s / 4)
    started = grown_at = time.monotonic()
    last, notice_at = 0, started + min(NOTICE_AFTER_S, WAIT_NOTICE_EVERY_S)
    lowest_waiting = min(r for r in range(world_size()) if r not in workers)
    them = f"rank{'s' if len(workers) > 1 else ''} {listed_ranks(workers)}"
    stopped = (
        "one of them stopped or is stuck; see their output"
        if len(workers) > 1
        else "it stopped or is stuck; see its output"
    )
    limit = f"{stall_s / 60:g} min" if stall_s >= 60 else f"{stall_s:g} s"
    while keys.add("done", 0) < len(workers):
        now, so_far = time.monotonic(), keys.add("progress", 0)
        if so_far != last:
            last, grown_at = so_far, now
        elif now - grown_at > stall_s:
            fail(
                f"rank {rank()} of {world_size()} waited for {them} to {what}, which got no further for {limit} "
                f"({shown(so_far)} so far): {stopped}, and run again"
            )
        if rank() == lowest_waiting and now >= notice_at:
            notice_at = now + WAIT_NOTICE_EVERY_S
            sys.stderr.write(
                redacted(  # ``what`` may name a URL
                    f"rank {rank()} of {world_size()}: waiting for {them} to {what} ({shown(so_far)} so far; "
                    f"giving up after {limit} without progress)\n"
                )
            )
            sys.stderr.flush()
        time.sleep(poll_s)


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
    restarts, most = (env_count(os.environ, f"TORCHELASTIC_{name}") for name in ("RESTART_COUNT", "MAX_RESTARTS"))
    if not advice and restarts < most:  # torchrun --max-restarts: it starts the job again by itself (run.start)
        # Not "restart k of N": a node restarted because another node failed does not count it.
        advice = f"torchrun restarts the job while restarts are left (--max-restarts {most}), from its last checkpoint"
    advice = advice or "restart the whole job with --resume auto to continue from its last checkpoint"
    return f"another process of this job stopped, so rank {rank()} of {world_size()} cannot go on; {advice}"
