"""A URL checkpoint's local copy in torch.hub's cache: the URL checked on every rank alike, the download,
with a bound on each wait for bytes, and the one-line errors a failed or damaged download ends in. Reading
the copy: load.py."""

import contextlib
import errno
import hashlib
import os
import socket
import ssl
import urllib.error
import urllib.parse
from collections.abc import Iterator

import torch

from util.cli.errors import fail
from util.cli.log import log
from util.cli.redact import shown_url, split_userinfo


def is_url(path: str) -> bool:
    return path.startswith(("https://", "http://"))


# What a damaged URL download says to do: every rank of a job ends in this line, the same one.
AFRESH = "its downloaded copy was removed: run again to download it afresh, or download it yourself and give the file"
# A damaged copy that was in the cache already is left there: another process (a rank of a job sharing the
# cache) may be reading it, and one that found it gone would download it again, or say it does not exist.
AFRESH_BY_HAND = "remove that file and run again to download it afresh, or download it yourself and give the file"


def remove_download(local: str) -> None:
    """Remove a copy this process has just downloaded and that does not load, so that the cache does not
    serve it again. Only its downloader reads it yet (in a job, the other ranks wait: download_on_every_rank)."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(local)


def cached_path(url: str) -> str:
    """Where ``url``'s copy lives in torch.hub's cache. Each URL has a folder of its own (a hash of
    it): two hosts' files of the same name must not share a copy."""
    name = os.path.basename(urllib.parse.urlparse(url).path) or "checkpoint"
    folder = os.path.join(torch.hub.get_dir(), "checkpoints", hashlib.sha256(url.encode()).hexdigest()[:16])
    return os.path.join(folder, name)


def check_url(url: str) -> None:
    """Refuse, in one line, a URL that cannot be downloaded as it is given: one with a user name or password,
    which torch.hub cannot send, and one urllib cannot read (an IPv6 address without its closing bracket, a
    port beyond 65535), which ended in a traceback. Every rank of a job decides alike, before any waits."""
    if split_userinfo(url)[1] is not None:
        # urllib takes it for part of the host's name, whose lookup fails ('Name or service not known'), or, with
        # a '/' in the password, for a port ("nonnumeric port: 'PASSWORD'S START'").
        # Shown here, whole: in a line, a quote in the password ends the URL there for ``redacted``.
        fail(
            f"checkpoint {shown_url(url)} holds a user name or password, which torch.hub cannot send: download it "
            f"yourself and give the file"
        )
    try:
        _ = urllib.parse.urlsplit(url).port  # reading the port checks it
    except ValueError as e:
        fail(f"checkpoint {shown_url(url)} is not a URL that can be read ({e}); check it")


def download(url: str) -> tuple[str, bool]:
    """The local copy of ``url`` in torch.hub's cache (``cached_path``), downloaded if not there yet, and
    whether this call downloaded it."""
    check_url(url)
    local = cached_path(url)
    if os.path.isfile(local):
        return local, False
    log.info(f"downloading {url} to {local}")
    try:
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with _socket_timeout(STALL_TIMEOUT_S):
            torch.hub.download_url_to_file(url, local, progress=False)  # to a temporary file, then renamed
    except Exception as e:  # network errors, HTTP errors, a cache folder that cannot be written
        if _stalled(e):  # torch.hub has removed its temporary file: nothing is left to take for the checkpoint
            fail(
                f"checkpoint {url} could not be downloaded: no bytes came for {STALL_TIMEOUT_S:g} s (the server or "
                f"the connection stalled); run again, or download it yourself and give the file"
            )
        if isinstance(e, OSError) and not isinstance(e, _NETWORK_ERRORS) and e.errno in _CACHE_ERRNOS:
            fail(
                f"checkpoint {url} cannot be downloaded into torch.hub's cache {os.path.dirname(local)} "
                f"({e.strerror}): set TORCH_HOME to a folder you can write, or download it yourself and give the file"
            )
        fail(
            f"checkpoint {url} could not be downloaded ({type(e).__name__}: {str(e)[:160]}); "
            f"download it yourself and give the file"
        )
    return local, True


# How long a download waits for its next bytes (or for its connection) before it gives up: torch.hub's
# urlopen has none, and a connection that stops sending (a dead link, a proxy that holds it open) blocked
# the process for ever (in a job, the others gave up after 30 min and the downloader hung on). It bounds
# each wait for bytes, not the download: a slow one that keeps sending is never cut. Two minutes: servers
# and proxies that are slow to start sending a large file, and TCP's retransmissions over a lossy link (a
# few seconds, doubling), stay well inside it; and as long as Linux waits for a connection that is never
# answered (its SYN retries, about 2 min). Tests shrink it.
STALL_TIMEOUT_S = 120.0


@contextlib.contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """Python's default socket timeout set to ``seconds`` inside the block, as before after it: urllib's
    sockets take it when torch.hub opens the URL, as timeouts of their connection and of each read. Sockets
    made in C++ (torch.distributed's store, gloo, NCCL) never read it, nor do Python sockets made before;
    one another thread made meanwhile would, and none of ours makes any (the heartbeat of a job's
    downloader, work_while_others_wait, talks to the C++ store; data-loader workers are processes)."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _stalled(error: Exception) -> bool:
    """Whether ``error`` is a socket timeout: while the body is read (raised as it is), or while urllib
    connects or reads the headers (wrapped in a URLError)."""
    reason = error.reason if isinstance(error, urllib.error.URLError) else error
    return isinstance(reason, TimeoutError)  # socket.timeout is TimeoutError


# What a cache folder that cannot be written raises (read-only, full, a file in its path), not the network: the
# advice is another folder, not another download.
_CACHE_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST)
# The network's OSErrors: urllib's, and SSL's (raised unwrapped while the body is read), whose SSL error codes
# stand in errno (SSL_ERROR_SSL, a broken record, is 1: EPERM's).
_NETWORK_ERRORS = (urllib.error.URLError, ssl.SSLError)
