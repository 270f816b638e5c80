"""Cooperative stop on SIGTERM/SIGUSR1/SIGUSR2 (cluster preemption or time limit).

The handler only records the request; the training loop acts on it at its next check point,
where all ranks agree, saves a checkpoint at the exact position and raises ``Interrupted``.
The handlers installed before ours (submitit's requeue handler, for instance) are remembered,
so that a launcher can hand the signal over once the checkpoint is safely written.
"""

import signal
import sys
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)
_requested: int | None = None
_previous: dict[int, Any] = {}


def _handler(signum: int, frame: object) -> None:
    global _requested
    _requested = signum
    # Not the log: only rank 0 logs, and this must show on every rank.
    sys.stderr.write(f"received {signal.Signals(signum).name}: checkpointing at the next check point\n")


def install() -> None:
    for s in SIGNALS:
        previous = signal.signal(s, _handler)
        if previous is not _handler:
            _previous[s] = previous


def ignore_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a stop signal sent to the whole process group (``scancel``,
    ``kill -- -PGID``, a cluster's preemption) is the main process's to act on. Left to torch's
    own SIGTERM handler, the workers die and the main process crashes instead of checkpointing;
    the workers still exit when the main process closes the loader or dies."""
    for s in SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def reset() -> None:
    """Forget a stop request and the handlers remembered: for a process that runs one training
    after another (tests, notebooks), so that the next starts as a fresh process would."""
    global _requested
    _requested = None
    _previous.clear()


def requested() -> bool:
    return _requested is not None


def hand_over() -> None:
    """Call the handler that was installed before ours for the signal we received, if any."""
    if _requested is None:
        return
    previous = _previous.get(_requested)
    if callable(previous):
        previous(_requested, None)


def exit_code() -> int:
    """The conventional status of a process stopped by the signal: 128 + its number."""
    return 128 + (_requested or signal.SIGTERM)


class Interrupted(Exception):
    """Raised by the training loop after it saved a checkpoint because a stop was requested."""

    def __init__(self, checkpoint: str | None):
        super().__init__(f"stopped on request after writing {checkpoint}; continue with --resume auto")
        self.checkpoint = checkpoint
