"""The run's messages: ``log.info`` and ``log.warning`` on stdout, from rank 0 only (the convention of
timm and torchtitan). Errors do not pass through here: ``errors.run_cli`` writes them to stderr on
every rank, so that a failing rank is never silent."""

import logging
import os
import sys
import time

from util.cli.redact import redacted

log = logging.getLogger("mae")


class _Stdout(logging.Handler):
    """Lines on whatever ``sys.stdout`` is at the time (pytest's capture replaces it), flushed, so
    that a log followed with ``tail -f`` is current and a killed run loses no line."""

    stamp = False  # the time of day before each line, where several processes interleave
    lost = False  # stdout was found closed or unwritable: the run goes on without printing

    def emit(self, record: logging.LogRecord) -> None:
        if self.lost:
            return
        text = redacted(record.getMessage())  # a URL's secrets never reach the output (redact.py)
        if record.levelno == logging.WARNING:
            text = f"warning: {text}"
        if self.stamp:
            text = f"[{time.strftime('%H:%M:%S')}] {text}"
        if sys.stdout is None:  # Python's stdout where descriptor 1 was closed (>&-)
            self._give_up("closed")
            return
        try:
            sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except OSError as e:  # EPIPE (| head -1 ended), ENOSPC (a redirected log on a full disk), EIO
            self._give_up(f"unwritable ({e.strerror or e})")

    def _give_up(self, why: str) -> None:
        """A run's progress is not worth its training: where stdout cannot take a line (a pipe whose reader
        ended, a full disk under a redirected log, no stdout at all), say so once on stderr and go on
        silent."""
        self.lost = True
        stdout_to_devnull()
        try:  # stderr may be the same closed pipe (2>&1 | head -1)
            sys.stderr.write(
                f"warning: stdout is {why}: going on without printing (the files written, log.txt and TensorBoard "
                "of a training run too, are as usual); redirect stdout to a file to keep what is printed\n"
            )
            sys.stderr.flush()
        except (AttributeError, OSError):
            pass


def stdout_to_devnull() -> None:
    """Lead stdout's descriptor to /dev/null, so that lines still buffered for a closed pipe, flushed again at
    exit, neither fail nor end the process in a traceback ('Exception ignored ... BrokenPipeError')."""
    if sys.stdout is None:
        return
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError):  # no descriptor of its own (a replaced sys.stdout)
        sys.stdout = open(os.devnull, "w")


_handler = _Stdout()
log.addHandler(_handler)
log.setLevel(logging.INFO)
log.propagate = False


def set_rank(rank: int, distributed: bool) -> None:
    """Rank 0 shows everything, the other ranks nothing (their errors reach stderr through
    ``errors.run_cli``, not through this log); lines of a distributed run carry the time."""
    log.setLevel(logging.INFO if rank == 0 else logging.CRITICAL + 1)
    _handler.stamp = distributed
