"""Work on some ranks while the others wait for it as long as it gets on (a URL checkpoint's download),
not for a collective's fixed timeout: the workers publish their progress in the rendezvous store
(``distributed.rendezvous_store``), which the waiting ranks poll."""

import contextlib
import sys
import threading
import time
import uuid
from collections.abc import Callable, Collection
from typing import TypeVar

import torch.distributed as dist

from util.cli.errors import fail, listed_ranks
from util.cli.redact import redacted
from util.train import distributed

T = TypeVar("T")
WAIT_KEYS = "mae_wait"  # the prefix of work_while_others_wait's keys in the store
WAIT_NOTICE_EVERY_S = 60.0  # how often the waiting ranks say what they wait for (the first after NOTICE_AFTER_S)


def work_while_others_wait(
    workers: Collection[int],
    work: Callable[[], T],
    progress: Callable[[], int],
    what: str,
    shown: Callable[[int], str] = str,
) -> T | None:
    """``work()`` on the ranks ``workers`` (its result there; None on the others) while the others wait
    for them as long as they get on, not for a collective's fixed ``COLLECTIVE_TIMEOUT``: a download of
    gigabytes at a slow link outlasts it, and the waiting ranks ended in a collective's timeout while
    the downloader was healthy. ``progress()``: a count that grows while a worker gets on (bytes
    downloaded), which it publishes in the rendezvous store every few seconds; the others give up,
    with one line, once the workers' count has not grown for ``COLLECTIVE_TIMEOUT`` (a worker killed,
    or stuck). Meanwhile the lowest waiting rank says every minute or so that it waits for them to
    ``what`` (a verb's phrase: 'download URL') and how far they got, as ``shown`` writes the count.
    Starts with a collective on every rank (rank 0 names the call's keys); does not end with one: the
    caller's next collective waits for the workers."""
    store = distributed.rendezvous_store()
    if not distributed.is_dist() or store is None:  # a group started without join(): no store to meet on
        return work() if distributed.rank() in workers else None
    # Keys of this call alone, named by rank 0 at random (a short collective before the work): torchrun's store
    # outlives the processes it restarts, unprefixed across nodes (generation_store), and the "done" an earlier
    # attempt's wait left ended this one at once, into a collective that timed out during the download.
    call = distributed.from_main(uuid.uuid4().hex if distributed.is_main_process() else None)
    keys = dist.PrefixStore(f"{WAIT_KEYS}/{call}", store)
    stall_s = distributed.COLLECTIVE_TIMEOUT.total_seconds()
    if distributed.rank() in workers:
        return _work_publishing(keys, work, progress, min(5.0, stall_s / 4))
    _wait_for_workers(keys, sorted(workers), stall_s, what, shown)
    return None


def _work_publishing(keys: dist.Store, work: Callable[[], T], progress: Callable[[], int], every_s: float) -> T:
    """``work()``, adding how far ``progress()`` got since it started to the store's "progress" every
    ``every_s`` seconds (a count of all workers: a stuck one among several shows once the others finish),
    and "done" once it ends, failed or not: the waiting ranks then meet the caller's next collective,
    which carries its outcome."""
    stop, start = threading.Event(), progress()
    published = 0

    def publish() -> None:
        nonlocal published
        grown = max(progress() - start, published)  # never less: the count of all workers only grows
        keys.add("progress", grown - published)
        published = grown

    def beat() -> None:
        while not stop.wait(every_s):
            with contextlib.suppress(Exception):  # a store gone: the main thread finds out at its next collective
                publish()

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        return work()
    finally:
        stop.set()
        thread.join()
        keys.add("done", 1)


def _wait_for_workers(
    keys: dist.Store, workers: list[int], stall_s: float, what: str, shown: Callable[[int], str]
) -> None:
    """Poll the store until every one of ``workers`` is done; fail once their progress has not grown
    for ``stall_s`` seconds. A store that cannot be reached (rank 0's process, which serves it outside
    torchrun, stopped) raises the DistError that says another process stopped."""
    poll_s = min(1.0, stall_s / 4)
    started = grown_at = time.monotonic()
    last, notice_at = 0, started + min(distributed.NOTICE_AFTER_S, WAIT_NOTICE_EVERY_S)
    lowest_waiting = min(r for r in range(distributed.world_size()) if r not in workers)
    them = f"rank{'s' if len(workers) > 1 else ''} {listed_ranks(workers)}"
    stopped = (
        "one of them stopped or is stuck; see their output"
        if len(workers) > 1
        else "it stopped or is stuck; see its output"
    )
    limit = f"{stall_s / 60:g} min" if stall_s >= 60 else f"{stall_s:g} s"
    while keys.add("done", 0) < len(workers):
        now, so_far = time.monotonic(), keys.add("progress", 0)
        if so_far != last:
            last, grown_at = so_far, now
        elif now - grown_at > stall_s:
            fail(
                f"rank {distributed.rank()} of {distributed.world_size()} waited for {them} to {what}, which got no "
                f"further for {limit} ({shown(so_far)} so far): {stopped}, and run again"
            )
        if distributed.rank() == lowest_waiting and now >= notice_at:
            notice_at = now + WAIT_NOTICE_EVERY_S
            sys.stderr.write(
                redacted(  # ``what`` may name a URL
                    f"rank {distributed.rank()} of {distributed.world_size()}: waiting for {them} to {what} "
                    f"({shown(so_far)} so far; giving up after {limit} without progress)\n"
                )
            )
            sys.stderr.flush()
        time.sleep(poll_s)
