"""The run's messages: ``log.info`` and ``log.warning`` on stdout, from rank 0 only (the convention of
timm and torchtitan). Errors do not pass through here: ``errors.run_cli`` writes them to stderr on
every rank, so that a failing rank is never silent."""

import logging
import sys
import time

log = logging.getLogger("mae")


class _Stdout(logging.Handler):
    """Lines on whatever ``sys.stdout`` is at the time (pytest's capture replaces it), flushed, so
    that a log followed with ``tail -f`` is current and a killed run loses no line."""

    stamp = False  # the time of day before each line, where several processes interleave

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.levelno == logging.WARNING:
            text = f"warning: {text}"
        if self.stamp:
            text = f"[{time.strftime('%H:%M:%S')}] {text}"
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


_handler = _Stdout()
log.addHandler(_handler)
log.setLevel(logging.INFO)
log.propagate = False


def set_rank(rank: int, distributed: bool) -> None:
    """Rank 0 shows everything, the other ranks nothing (their errors reach stderr through
    ``errors.run_cli``, not through this log); lines of a distributed run carry the time."""
    log.setLevel(logging.INFO if rank == 0 else logging.CRITICAL + 1)
    _handler.stamp = distributed
