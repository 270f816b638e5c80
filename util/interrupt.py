"""Cooperative stop on SIGTERM/SIGUSR1 (cluster preemption or time limit).

The handler only records the request; the training loop acts on it at its next check point,
where all ranks agree, save a checkpoint at the exact position and stop.
"""

import signal

_requested: int | None = None


def _handler(signum: int, frame: object) -> None:
    global _requested
    _requested = signum
    print(f"received signal {signal.Signals(signum).name}: checkpointing at the next check point", force=True)


def install(signals: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
    for s in signals:
        signal.signal(s, _handler)


def requested() -> bool:
    return _requested is not None


def request(signum: int = signal.SIGTERM) -> None:
    """Ask for a stop as a signal would (used by submitit's checkpoint hook and by tests)."""
    global _requested
    _requested = signum


class Interrupted(Exception):
    """Raised by the training loop after it saved a checkpoint because a stop was requested."""

    def __init__(self, checkpoint: str | None):
        super().__init__(f"stopped on request; resume from {checkpoint}")
        self.checkpoint = checkpoint
