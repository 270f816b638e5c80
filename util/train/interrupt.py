"""Cooperative stop on SIGTERM/SIGUSR1/SIGUSR2 (cluster preemption or time limit) and Ctrl-C.

The handler only records the request; the training loop acts on it at its next check point,
where all ranks agree, saves a checkpoint at the exact position and raises ``Interrupted``.
The handlers installed before ours (submitit's requeue handler) are remembered, so that a
launcher can hand the signal over once the checkpoint is written. A second Ctrl-C stops at once
(``KeyboardInterrupt``, which ``errors.run_cli`` turns into one line).
"""

import atexit
import contextlib
import ctypes
import multiprocessing
import multiprocessing.util  # its exit hook is registered before ours, so ours runs first
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

# The signals a cluster sends before it stops or requeues a job: handed over to the previous handler.
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # Linux's prctl option: a signal the kernel sends this process when its parent ends
_requested: int | None = None
# The preemption signals this process received, and (``agree``) those any rank of its job received.
_received: set[int] = set()
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: object) -> None:
    global _requested
    if signum == signal.SIGINT and _requested is not None:
        raise KeyboardInterrupt  # the second request: do not wait for the check point
    _requested = signum
    if signum in PREEMPTION_SIGNALS:
        _received.add(signum)
    again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
    # Not the log: only rank 0 logs, and this must show on every rank.
    sys.stderr.write(f"received {signal.Signals(signum).name}: checkpointing at the next check point{again}\n")


def install() -> None:
    """Take the stop signals; a run started in this process after a stopped one starts unstopped."""
    global _requested
    _requested = None
    _received.clear()
    for s in SIGNALS:
        previous = signal.signal(s, _handler)
        if previous is not _handler:
            _previous[s] = previous


def uninstall() -> None:
    """Put back the handlers ``install`` replaced and forget any request (tests, notebooks)."""
    global _requested
    for s, previous in _previous.items():
        signal.signal(s, previous)
    _previous.clear()
    _requested = None
    _received.clear()


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a stop signal sent to the whole process group (``scancel``,
    Ctrl-C in a terminal) is the main process's to act on. Left to torch's own handlers, the workers
    die and the main process crashes instead of checkpointing. Deaf to SIGTERM, they end with their
    process instead (``end_with_parent``)."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)  # drops one that came since the fork (``starting_workers``)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
    end_with_parent()


@contextlib.contextmanager
def starting_workers() -> Iterator[None]:
    """Start a loader's workers inside the block (``iter(loader)``): they start with the stop signals blocked,
    which ``ignore_in_worker`` ignores and unblocks. Between their fork and their ``worker_init_fn`` torch's own
    SIGTERM handler ended a worker that a SIGTERM to the process group reached (scancel; torchrun's to each
    rank's group), and the main process ended in a traceback instead of checkpointing. Here the signals wait for
    the block's end."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def end_with_parent() -> None:
    """Have the kernel kill this loader worker as soon as the process that started it ends, however it
    ends. A rank killed with -9 (the OOM killer), or leaving with os._exit once a peer is gone
    (``errors.run_cli``), runs no exit hook: its workers lived on for up to 5 s (torch's watchdog), and for
    good where it ended before a worker had started that watchdog, and their copies of the rank's sockets
    kept the job's other ranks from seeing it gone as long. Linux only, and only for a worker the rank
    forked or spawned itself: a forkserver's workers are the server's children, whose death the kernel's
    signal would follow instead (the DataLoader's start method; torch's watchdog is theirs)."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    if os.getppid() == parent.pid:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if not parent.is_alive():  # it ended before the signal was asked for (its pipe, not the pid, tells)
        os._exit(0)


def _kill_loader_workers() -> None:
    """At exit, before multiprocessing's own hook, which ends daemonic children (the loaders'
    workers) with SIGTERM, which ``ignore_in_worker`` makes them ignore, and then waits for them
    forever. Workers still alive then (their loader kept by an error's traceback) are killed."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would call each kill an error
    for worker in workers:
        worker.kill()
    for worker in workers:
        worker.join(5)


atexit.register(_kill_loader_workers)


def requested() -> bool:
    return _requested is not None


def received() -> set[int]:
    """The preemption signals this process received, and those ``agree`` learnt other ranks received."""
    return set(_received)


def agree(received_by_any_rank: set[int]) -> None:
    """Note the preemption signals some rank of the job received (the stop's check point gathers them), so that
    ``hand_over`` passes them on here too. A signal reaches each node on its own time, or one node only: rank 0,
    which alone requeues a submitit job, stopped with the others without one, and the job ended unrequeued."""
    _received.update(received_by_any_rank)


def hand_over() -> None:
    """Call the handlers installed before ours for the preemption signals this process or (``agree``) any rank
    received, SIGTERM's first: submitit's for SIGTERM logs, its for SIGUSR2 requeues the job on rank 0 and exits.
    Ctrl-C is the user's: nothing to hand over."""
    for s in PREEMPTION_SIGNALS:
        previous = _previous.get(s) if s in _received else None
        if callable(previous):
            previous(s, None)


def exit_code() -> int:
    """The conventional status of a process stopped by the signal: 128 + its number."""
    return 128 + (_requested or signal.SIGTERM)


class Interrupted(Exception):
    """Raised by the training loop after it saved a checkpoint because a stop was requested."""

    def __init__(self, checkpoint: str | None, output_dir: str = ""):
        if checkpoint is not None:
            super().__init__(f"stopped on request after writing {checkpoint}; continue with --resume auto")
        elif output_dir:  # asked before the first check point: nothing of this run to save yet
            super().__init__(f"stopped on request before training began; nothing new in {output_dir} to save")
        else:
            super().__init__("stopped on request; nothing was saved, since the run has no --output_dir")
        self.checkpoint = checkpoint
