"""The --output_dir a run writes into, held by one run at a time (a lock, claimed at the start and
released at the end) and seen by every node of a shared folder."""

import fcntl
import os
import time

from util.cli.errors import fail
from util.cli.log import log

# Folders this process writes its run into, and the descriptor whose lock claims each (see claim_output_dir).
_claimed: dict[str, int] = {}
CLAIM_WAIT_SECONDS = 10.0  # for a stopped run still writing its last checkpoint (Ctrl-C, then started again)


def claim_output_dir(path: str, flag: str) -> None:
    """Hold an exclusive lock on the folder ``path`` until ``release_output_dirs`` or the process's end,
    so that a second run into it (a job submitted twice, a run started again while the first still
    trains) stops at its start, in one line, instead of both writing the same checkpoints and log.txt.
    The kernel drops the lock however the process ends, ``kill -9`` too: nothing stale is left. A
    process may claim a folder again (runs one after another in a notebook). Where the file system
    cannot lock a folder (NFS, some others), runs go on unguarded, after one warning."""
    real = os.path.realpath(path)
    if real in _claimed:
        return
    fd = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + CLAIM_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() < deadline:
                time.sleep(0.2)
                continue
            os.close(fd)
            fail(
                f"{flag} {path} is in use by another run (still training, or a job submitted twice): two runs "
                f"would overwrite each other's checkpoints; wait for it to end, or give another {flag}"
            )
        except OSError as e:  # no locks on this file system: unguarded, and said so once
            os.close(fd)
            why = e.strerror or e
            log.warning(f"{flag} {path} cannot be locked ({why}): a second run into it would not be noticed")
            return
    _claimed[real] = fd


def release_output_dirs() -> None:
    """Give back every folder ``claim_output_dir`` holds (a run that ended; tests)."""
    for fd in _claimed.values():
        os.close(fd)  # the lock goes with the last descriptor of it: the forked children's are closed below
    _claimed.clear()


# A forked child (a DataLoader worker) shares the lock of each descriptor it inherits, and would hold the
# folder after its parent released it or was killed with -9, until it ended too. It closes its copies,
# which leaves the parent's lock as it is, and claims nothing.
os.register_at_fork(after_in_child=release_output_dirs)


def appears(path: str, seconds: float) -> bool:
    """Whether ``path`` exists, now or within ``seconds``: another node's write reaching this node's view of a
    shared folder (an NFS client's cache lags)."""
    deadline = time.monotonic() + seconds
    while not os.path.exists(path):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True
