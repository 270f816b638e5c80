"""User-facing errors: one line that names the file or flag and says what to do."""

import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(Exception):
    """A problem with the user's input (flags, data, checkpoints), not a bug in the code."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


class NonFiniteLoss(UserError):
    """Training diverged: a loss, or the weights or optimizer state about to be saved, are not finite."""


def lower_lr(args: Any) -> str:
    """The flag a diverged run should lower: ``--lr`` if the user gave it, else ``--blr``.
    (``run.start`` replaces ``args.lr`` by the effective lr, so it records ``args.lr_given``.)"""
    return "--lr" if getattr(args, "lr_given", False) else "--blr"


def run_cli(main: Callable[[], None]) -> None:
    """Run an entry point, turning a ``UserError`` into one line on stderr and exit status 2,
    and a stop on request (after its checkpoint) into status 128 + the signal's number.

    A ``UserError`` raised inside a data-loader worker reaches us wrapped with the worker's
    traceback; its last line carries the original message.
    """
    from util.train import interrupt

    try:
        main()
    except interrupt.Interrupted as e:
        sys.stderr.write(f"{e}\n")  # every rank, not only rank 0's log
        sys.exit(interrupt.exit_code())
    except UserError as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        message = lines[-1] if lines else "unknown error"
        marker = "UserError: "
        if marker in message:
            message = message.split(marker, 1)[1]
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)
