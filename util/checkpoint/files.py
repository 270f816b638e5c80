"""Checkpoint files on disk: names that sort by progress, atomic writes, listing and pruning.
``checkpoint-<epoch>.pth`` holds a complete epoch, ``checkpoint-<epoch>-step<k>.pth`` its first k iterations."""

import os
import re
from collections.abc import Iterable
from typing import Any, BinaryIO

import torch

from util.atomic import atomic_write, remove_stale_temporaries

_NAME = re.compile(r"^checkpoint-(\d+)(?:-step(\d+))?\.pth$")


def checkpoint_name(epoch: int, step: int | None = None) -> str:
    return f"checkpoint-{epoch}.pth" if step is None else f"checkpoint-{epoch}-step{step}.pth"


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` through ``util.atomic.atomic_write`` (never a partial file); a failed write
    raises what stopped it (the ``OSError`` of a full disk or a quota, the ``KeyboardInterrupt`` of a
    second Ctrl-C), not torch's "unexpected pos"."""

    def write(f: BinaryIO) -> None:
        writer = _KeepError(f)
        try:
            torch.save(obj, writer)
        except RuntimeError as e:
            # torch reports a failed write as "unexpected pos N vs M": raise the cause instead.
            if writer.error is None:
                raise
            raise writer.error from e

    atomic_write(path, write)


class _KeepError:
    """A file's ``write`` that keeps the first exception it raised (torch.save turns it into a
    RuntimeError that no longer says what happened)."""

    def __init__(self, f: Any):
        self.f, self.error = f, None

    def write(self, data: bytes) -> int:
        try:
            return self.f.write(data)
        except BaseException as e:  # KeyboardInterrupt too: a second Ctrl-C during the write
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


# Listing and pruning
def progress(name: str) -> tuple[int, int] | None:
    """Sort key: (epoch, iterations done) of the position a checkpoint resumes at."""
    if not (m := _NAME.match(name)):
        return None
    epoch, step = int(m.group(1)), m.group(2)
    return (epoch + 1, 0) if step is None else (epoch, int(step))


def list_checkpoints(output_dir: str) -> list[str]:
    """Checkpoint paths in ``output_dir``, oldest progress first."""
    if not os.path.isdir(output_dir):
        return []
    named = [(p, n) for n in os.listdir(output_dir) if (p := progress(n)) is not None]
    # Only files: a folder or a broken link named like a checkpoint is not one (and cannot be pruned).
    return [path for _, n in sorted(named) if os.path.isfile(path := os.path.join(output_dir, n))]


def prune(
    output_dir: str,
    keep_last: int,
    keep_every: int,
    final_epoch: int,
    just_written: str | None = None,
    finals: Iterable[str] = (),
) -> list[str]:
    """Delete stale temporaries and old checkpoints; return the checkpoints removed. Kept: the newest and
    ``just_written``; of complete epochs, the ``keep_last`` newest, every ``keep_every``-th, the final one
    and ``finals`` (names: the final checkpoints of the shorter runs this one extends)."""
    remove_stale_temporaries(output_dir, _NAME.match)  # writes a killed process never finished (ours are renamed)
    paths = list_checkpoints(output_dir)
    kept = kept_checkpoints(paths, keep_last, keep_every, final_epoch, finals)
    removed = [p for p in paths[:-1] if p not in kept and not (just_written and os.path.samefile(p, just_written))]
    for path in removed:  # the newest checkpoint (paths[-1]) always stays
        os.remove(path)
    return removed


def kept_checkpoints(
    paths: list[str], keep_last: int, keep_every: int, final_epoch: int, finals: Iterable[str] = ()
) -> set[str]:
    """Which of ``paths`` (oldest progress first) the retention flags keep besides the newest: all with
    ``keep_last`` 0, else the complete epochs that are among the ``keep_last`` newest, every
    ``keep_every``-th, the final one or named in ``finals``."""
    if keep_last <= 0:
        return set(paths)  # keep everything
    # Complete epochs by their number (mid-epoch checkpoints have a step in their name).
    complete = {p: int(m.group(1)) for p in paths if (m := _NAME.match(os.path.basename(p))).group(2) is None}
    kept = {p for p, epoch in complete.items() if epoch % keep_every == 0 or epoch == final_epoch}
    kept |= {p for p in complete if os.path.basename(p) in set(finals)}
    return kept | set(list(complete)[-keep_last:])
