"""Where this process stands in a distributed job, read from its launcher's environment (torchrun's,
SLURM's or OpenMPI's): pure functions of an env mapping. Each impossible value is a one-line error
naming the variable, checked before anything waits; the counts a launcher keeps (restarts, processes
of a node) are read leniently instead."""

from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

from util.cli.errors import fail

START_TIMEOUT_VAR = "MAE_DIST_START_TIMEOUT"
DEFAULT_START_TIMEOUT_S = 300.0


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


def launcher_restarts(env: Mapping[str, str]) -> int:
    """How many times a launcher started this job's processes again with the same command: torchrun
    (``--max-restarts``, once a process failed; its ``TORCHELASTIC_RESTART_COUNT``) or SLURM (a requeued
    job: preemption, a node failure, ``scontrol requeue``; its ``SLURM_RESTART_COUNT``). 0 on a first start."""
    return max(env_count(env, name) for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
