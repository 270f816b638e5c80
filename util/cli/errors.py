"""User-facing errors: one line that names the file or flag and says what to do."""

import contextlib
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any, NoReturn

from util.cli.redact import redacted


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoints), not a bug in the code."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message (its type's name when it has none), to quote in a one-line error."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def listed_ranks(ranks: list[int]) -> str:
    """Ranks as messages name them: '0, 2, 3'."""
    return ", ".join(map(str, ranks))


class NonFiniteLoss(UserError):
    """Training diverged: a loss, or the weights or optimizer state about to be saved, are not finite."""


def divergence_advice(args: Any) -> str:
    """What a diverged run should change: lower ``--lr`` if the user gave it (``args.lr_given``: run.start
    replaces ``args.lr`` by the effective lr), else ``--blr``; and a wider precision than the run's, if any."""
    advice = f"Lower {'--lr' if getattr(args, 'lr_given', False) else '--blr'}"
    wider = {"fp16": "bf16 or fp32", "bf16": "fp32"}.get(getattr(args, "precision", None))
    return f"{advice}, or try --precision {wider}" if wider else advice


STOPPED_AT_ONCE = (
    "stopped at once by Ctrl-C; the files written so far are complete (a training run continues from its last "
    "checkpoint with --resume auto)"
)


STDOUT_GONE = (
    "error: stdout was closed before all was printed (its reader ended, as `| head` does); the files written are "
    "complete; redirect stdout to a file to keep what is printed"
)


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reader has ended (``| head -1`` after its line): poll says POLLERR there."""
    try:
        poll = select.poll()
        poll.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no stdout, or none with a descriptor
        return False


def run_cli(main: Callable[[], None], peer_advice: str = "") -> None:
    """Run an entry point, turning what is not a bug into one line on stderr (every rank) and an
    exit status: a ``UserError`` 2 (one raised in a data-loader worker comes wrapped in its traceback,
    whose last line carries the message); a stop on request after its checkpoint 128 + the signal's
    number; a second Ctrl-C (or one without our handler) 130, at once, wherever it lands; a peer
    process gone 1, with ``peer_advice`` (default: a training run's, to resume the whole job)."""
    from util.train import distributed

    with _ctrl_c_in_a_finalizer_stops_at_once():  # also while the ended run's frames are freed
        ended = _ended(main, peer_advice)
    if ended is None:
        return
    message, code = ended
    # The run is over: a second Ctrl-C now would only turn its last steps into a traceback, and a stop signal (the
    # SIGTERM torchrun sends the other ranks once one has exited) would add a line promising a checkpoint.
    with _stop_signals_ignored():
        sys.stderr.write(f"{redacted(message)}\n")  # every rank, not only rank 0's log; no URL's secrets
        distributed.cleanup_before_exit()  # now, not during the interpreter's shutdown
    sys.exit(code)


def _ended(main: Callable[[], None], peer_advice: str) -> tuple[str, int] | None:
    """``main()``; None where it returned, else the line that says how it ended and the exit status."""
    from util.train import distributed, interrupt

    try:
        main()
        return None
    except interrupt.Interrupted as e:
        return str(e), interrupt.exit_code()
    except UserError as e:
        return f"error: {_last_line(e)}", 2
    except KeyboardInterrupt:
        return STOPPED_AT_ONCE, 128 + signal.SIGINT
    except BrokenPipeError:
        if not _stdout_reader_gone():
            raise
        from util.cli.log import stdout_to_devnull

        stdout_to_devnull()
        return STDOUT_GONE, 128 + signal.SIGPIPE
    except Exception as e:
        if not distributed.peer_stopped(e):
            raise
        sys.stderr.write(f"error: {distributed.peer_stopped_message(peer_advice)}\n")
        sys.stderr.flush()
        # Not sys.exit: the broken process group's threads would abort the interpreter's shutdown
        # ("terminate called without an active exception") after the line.
        os._exit(1)


@contextlib.contextmanager
def _ctrl_c_in_a_finalizer_stops_at_once() -> Iterator[None]:
    """A Ctrl-C whose KeyboardInterrupt is raised inside a finalizer (a data loader's ``__del__`` waiting for its
    workers to stop) cannot propagate: Python printed it as "Exception ignored" with a traceback, and the run went
    on as if it had not come. Here it stops the process at once, in the line of a Ctrl-C that propagates."""
    previous = sys.unraisablehook

    def hook(unraisable: Any) -> None:
        if not isinstance(unraisable.exc_value, KeyboardInterrupt):
            previous(unraisable)
            return
        sys.stdout.flush()
        sys.stderr.write(f"{STOPPED_AT_ONCE}\n")
        sys.stderr.flush()
        os._exit(128 + signal.SIGINT)  # raised here, it would be ignored again

    sys.unraisablehook = hook
    try:
        yield
    finally:
        sys.unraisablehook = previous


@contextlib.contextmanager
def _stop_signals_ignored() -> Iterator[None]:
    """The stop signals (``interrupt.SIGNALS``) ignored inside the block, where the signal module allows it (the
    main thread), and as before after it."""
    from util.train import interrupt

    try:
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in interrupt.SIGNALS}
    except ValueError:  # not the main thread, where no handler runs either
        yield
        return
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


def _last_line(error: UserError) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    message = lines[-1] if lines else "unknown error"
    return message.split("UserError: ", 1)[-1]
