"""Reading a checkpoint once, at start-up (``Opened``), the same file on every rank of a job: what
--resume, --finetune and k-NN scoring start from. Which checkpoint --resume takes: resume.py."""

import argparse
import contextlib
import glob
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from util.checkpoint.download import cached_path, check_url, is_url
from util.checkpoint.entries import check_training_entries
from util.checkpoint.load import load_checkpoint
from util.cli.errors import UserError, fail, listed_ranks
from util.train import distributed, waiting


@dataclass(frozen=True)
class Opened:
    """A checkpoint read once, at start-up, and handed to whatever needs it (resume, encoder, flags)."""

    path: str
    ckpt: dict[str, Any]

    @property
    def args(self) -> argparse.Namespace | None:  # None for official releases, which store none
        saved = self.ckpt.get("args")
        return saved if isinstance(saved, argparse.Namespace) else None

    def flags_only(self) -> "Opened":
        """The path and the saved flags, without the weights and optimizer state: what may outlive the loading."""
        return Opened(self.path, {"args": self.ckpt.get("args")})


def open_checkpoint(path: str, training: bool = False) -> Opened:
    """Read ``path`` (verified, weights only); ``training``: to resume, its training entries checked."""
    ckpt = load_checkpoint(path)
    if training:
        check_training_entries(ckpt, path)
    return Opened(path, ckpt)


SHARED_CHECKPOINT = "give a checkpoint on storage every node of the job shares, or the same file on each node"


def open_on_every_rank(
    open_here: Callable[[], Opened], path: str, flag: str, advice: str = SHARED_CHECKPOINT
) -> Opened:
    """``open_here()`` on every rank, which must all read the same checkpoint ``path`` (each node reads
    its own view of the files). A rank that cannot, or a file that differs between ranks (its progress,
    its size), stops every rank with the same line, which ``advice`` ends; where no rank can read it,
    each says why as a single process would."""
    if is_url(path):
        download_on_every_rank(path, flag)
    try:
        opened, error = open_here(), None
    except UserError as e:
        opened, error = None, e
    if not distributed.is_dist():
        if error is not None:
            raise error
        return opened
    seen = distributed.gather(("error", str(error)) if error is not None else ("read", _fingerprint(opened)))
    failed = [rank for rank, (kind, _) in enumerate(seen) if kind == "error"]
    if error is not None and len(failed) == len(seen):
        raise error
    size = len(seen)
    if failed:
        read = [rank for rank in range(size) if rank not in failed]
        why = seen[failed[0]][1]
        # A URL's copies are in each rank's torch.hub cache: what to do is in the reason (a damaged copy).
        tail = "" if is_url(path) else f": every node of the job must see the same files; {advice}"
        fail(
            f"{flag} {path}: rank(s) {listed_ranks(failed)} of {size} cannot read it ({why}), rank(s) "
            f"{listed_ranks(read)} can{tail}"
        )
    if any(fingerprint != seen[0][1] for _, fingerprint in seen):
        shown = "; ".join(f"rank {rank}: {fingerprint}" for rank, (_, fingerprint) in enumerate(seen))
        fail(
            f"{flag} {path} is not the same file on every rank ({shown}): every node of the job must see the same "
            f"files; {advice}"
        )
    return opened


def download_on_every_rank(url: str, flag: str) -> None:
    """Put ``url``'s copy into every rank's cache, downloading it once per cache, not once per rank
    (eight ranks of a node fetching the same gigabyte at once): rank 0 first, so that a cache the
    whole job shares is filled once; then, round by round, the lowest rank of each machine whose
    cache still lacks it, while the others wait as long as its download gets on (``work_while_others_wait``:
    saying every minute how far it got). A downloader loads its copy once while they wait,
    so that one that does not load (truncated, an HTML page) is removed before any other rank reads
    it: removed later, a rank sharing the cache downloaded it again or found it gone. A failed or
    damaged download stops every rank with the downloader's line."""
    check_url(url)  # on every rank alike: a URL refused by the downloader alone left the others waiting
    if not distributed.is_dist():
        return
    machine, downloaders = socket.gethostname(), {0}
    for _ in range(distributed.world_size()):  # each round fills at least one more rank's cache
        # The others wait as long as the download gets on: a collective gave up after 30 minutes.
        error = waiting.work_while_others_wait(
            downloaders, lambda: _download_here(url), lambda: _bytes_so_far(url), f"download {url} for {flag}", _in_mb
        )
        seen = distributed.gather((machine, os.path.isfile(cached_path(url)), error))
        if failed := [(rank, error) for rank, (_, _, error) in enumerate(seen) if error]:
            rank, error = failed[0]
            fail(f"{flag}: rank {rank} of {len(seen)}: {error}")
        first_lacking: dict[str, int] = {}  # machine -> its lowest rank without a copy
        for rank, (host, has_it, _) in enumerate(seen):
            if not has_it:
                first_lacking.setdefault(host, rank)
        if not first_lacking:
            return
        downloaders = set(first_lacking.values())
    fail(f"{flag} {url}: downloaded, yet some ranks cannot see their copy in torch.hub's cache; check its folder")


def _download_here(url: str) -> str | None:
    """Download ``url`` into this rank's cache unless it is there, and load it once, removing a copy
    that does not load; the line that says why it failed, or None."""
    if os.path.isfile(cached_path(url)):
        return None
    try:
        load_checkpoint(url)
    except UserError as e:
        return str(e)
    return None


def _bytes_so_far(url: str) -> int:
    """The bytes of ``url``'s copy in this rank's cache: torch.hub's temporary files next to it while it
    downloads (``NAME.HEX.partial``), the copy once done."""
    local = cached_path(url)
    total = 0
    for path in [*glob.glob(glob.escape(local) + ".*.partial"), local]:
        with contextlib.suppress(OSError):  # renamed or removed meanwhile
            total += os.path.getsize(path)
    return total


def _in_mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _fingerprint(opened: Opened) -> str:
    """What tells two copies of a checkpoint apart cheaply: its position and its size in bytes."""
    step, epoch = opened.ckpt.get("step"), opened.ckpt.get("epoch")
    where = "no epoch" if epoch is None else f"epoch {epoch}" + ("" if step is None else f" iteration {step}")
    size = os.path.getsize(opened.path) if os.path.isfile(opened.path) else None
    return where if size is None else f"{where}, {size} bytes"
