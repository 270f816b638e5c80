"""Smoothed values for the progress lines, TensorBoard and a JSON-lines log.txt."""

import contextlib
import datetime
import json
import os
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from util.atomic import atomic_append, atomic_write, remove_stale_temporaries
from util.cli.errors import fail
from util.cli.log import log
from util.train import distributed


def format_duration(seconds: float) -> str:
    """Whole seconds as H:MM:SS, days counted apart ("1 day, 2:03:04"); strftime("%H:%M:%S") of a
    gmtime would wrap at 24 hours, which long runs pass."""
    return str(datetime.timedelta(seconds=int(seconds)))


class SmoothedValue:
    """A running window median/average plus the global average of a scalar series."""

    def __init__(self, window: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})"):
        self.values: deque[float] = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value: float, n: int = 1) -> None:
        self.values.append(value)
        self.total += value * n
        self.count += n

    @property
    def median(self) -> float:
        ordered = sorted(self.values)
        return ordered[len(ordered) // 2] if ordered else 0.0

    @property
    def avg(self) -> float:
        return sum(self.values) / max(len(self.values), 1)

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.values[-1] if self.values else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named scalars, shown as one progress line."""

    def __init__(self, delimiter: str = "  "):
        self.meters: dict[str, SmoothedValue] = defaultdict(SmoothedValue)
        self.delimiter = delimiter

    def update(self, n: int = 1, **values: float) -> None:
        for name, value in values.items():
            self.meters[name].update(float(value), n)

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def __str__(self) -> str:
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def averages_over_ranks(self, device: torch.device | str) -> dict[str, float]:
        """Each meter's average over every rank's values, as in the official log.txt (whose meters are summed over
        the processes at an epoch's end). One collective: every rank must call it."""
        names = sorted(self.meters)  # the same order on every rank
        sums = distributed.all_reduce_sum([x for name in names for x in self._sums(name)], device)
        averages = {name: sums[2 * i] / max(sums[2 * i + 1], 1) for i, name in enumerate(names)}
        return {name: averages[name] for name in self.meters}  # in the order they were first logged

    def sums_of_every_rank(self, device: torch.device | str) -> list[dict[str, list[float]]]:
        """Each rank's running total and count of each meter, in rank order: what a mid-epoch checkpoint needs so
        that the resumed epoch's averages equal an uninterrupted epoch's. One collective: every rank must call it
        (each fills its own slots of a vector of zeros, so the sum hands every value on exactly)."""
        names, world, rank = sorted(self.meters), distributed.world_size(), distributed.rank()
        width = 2 * len(names)
        slots = [0.0] * (width * world)
        slots[rank * width : (rank + 1) * width] = [x for name in names for x in self._sums(name)]
        summed = distributed.all_reduce_sum(slots, device)
        return [
            {name: [summed[r * width + 2 * i], int(summed[r * width + 2 * i + 1])] for i, name in enumerate(names)}
            for r in range(world)
        ]

    def load_sums(self, sums: dict[str, list[float]]) -> None:
        for name, (total, count) in sums.items():
            self.meters[name].total, self.meters[name].count = total, int(count)

    def _sums(self, name: str) -> tuple[float, int]:
        return self.meters[name].total, self.meters[name].count


def tensorboard_step(epoch: int, steps_done: int, iterations: int) -> int:
    """TensorBoard's x for training after ``steps_done`` of an epoch's ``iterations``: the official 1000 per epoch."""
    return int((epoch + steps_done / iterations) * 1000)


class RunLog:
    """TensorBoard writer and ``log.txt`` (one JSON object per epoch), on rank 0 only.

    log.txt is rewritten at start from ``history``, the epoch lines a checkpoint carries, so that
    it agrees with the checkpoint the run continues from (a fresh start replaces an old log, a
    fall-back to an earlier checkpoint drops later lines, a line lost to a kill after its checkpoint
    comes back); without one (an older checkpoint) it is only appended to. TensorBoard likewise: a
    run hides the events its folder holds from ``purge_step`` on (a resumed run: what it logged after
    its checkpoint, which it now logs again; a fresh start: 0, all of them). Failing to write log.txt
    stops the run in one line; TensorBoard and the pictures are extras: failing to write them (a full
    disk) is one warning, and training goes on.
    """

    def __init__(
        self, log_dir: str, output_dir: str, history: list[dict[str, Any]] | None = None, purge_step: int | None = None
    ):
        self.writer = None
        self.log_dir = log_dir
        self.log_path = os.path.join(output_dir, "log.txt") if output_dir else None
        self.history = history if history is not None else []
        self._written = len(self.history)  # lines of history already in log.txt
        if distributed.is_main_process() and log_dir:
            self._open_tensorboard(purge_step)
        if self.log_path and distributed.is_main_process():
            # What a killed run left half-written of log.txt and the pictures (the run holds --output_dir).
            remove_stale_temporaries(output_dir, lambda name: name == "log.txt" or name.endswith(".png"))
            if history is not None:
                self._rewrite()

    def _open_tensorboard(self, purge_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _leave_tensorboard_thread_errors_to_runlog()
        try:
            os.makedirs(self.log_dir, exist_ok=True)
            # It writes and flushes its first event here; with purge_step, the one TensorBoard purges at.
            self.writer = SummaryWriter(log_dir=self.log_dir, purge_step=purge_step)
        except OSError as e:
            self._tensorboard_off(e)

    def _tensorboard(self, call: Callable[[Any], object]) -> None:
        """``call(writer)``; an ``OSError`` (a full disk) turns TensorBoard off with one warning. An
        error of its writer thread surfaces here, at the next call after it."""
        if not self.writer:
            return
        try:
            call(self.writer)
        except OSError as e:
            writer, self.writer = self.writer, None
            self._tensorboard_off(e)
            with contextlib.suppress(OSError):
                writer.close()  # it flushes first, which raises the error again

    def _tensorboard_off(self, error: OSError) -> None:
        log.warning(
            f"cannot write TensorBoard events in {self.log_dir} ({error.strerror or error}); TensorBoard is off "
            f"for the rest of this run, training goes on (log.txt and checkpoints as usual)"
        )

    def _rewrite(self) -> None:
        """Replace log.txt by the history, atomically (a kill leaves the old or the new file)."""
        text = "".join(json.dumps(line) + "\n" for line in self.history)
        old = Path(self.log_path).read_text() if os.path.exists(self.log_path) else None
        if old == text:
            return
        if old:
            log.info(f"{self.log_path}: rewritten with the {len(self.history)} epoch lines of the run's checkpoint")
        with self._writing():
            atomic_write(self.log_path, lambda f: f.write(text.encode("utf-8")))

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        try:
            yield
        except OSError as e:
            fail(
                f"cannot write {self.log_path}: {e.strerror or e}; it is rewritten from the last checkpoint "
                f"when the run continues with --resume auto"
            )

    def scalars(self, step: int, **values: float) -> None:
        def add(writer: Any) -> None:
            for name, value in values.items():
                writer.add_scalar(name, value, step)

        self._tensorboard(add)

    def image(self, tag: str, image_hwc: Any, step: int) -> None:
        self._tensorboard(lambda writer: writer.add_image(tag, image_hwc, step, dataformats="HWC"))

    def write_optional(self, path: str, write: Callable[[], None]) -> bool:
        """Whether ``write()`` wrote ``path``, a file training can do without (a reconstruction
        picture): an ``OSError`` (a full disk) is one warning and training goes on."""
        try:
            write()
        except OSError as e:
            log.warning(f"cannot write {path} ({e.strerror or e}); training goes on without it")
            return False
        return True

    def record(self, stats: dict[str, Any]) -> None:
        """Add an epoch's line to the history (the next checkpoint carries it), not yet to log.txt."""
        self.history.append(stats)

    def write(self) -> None:
        """Append the recorded lines not yet in log.txt (the whole file rewritten: never a torn line)."""
        if not distributed.is_main_process():
            return
        self._tensorboard(lambda writer: writer.flush())
        if self.log_path and self._written < len(self.history):
            text = "".join(json.dumps(line) + "\n" for line in self.history[self._written :])
            with self._writing():
                atomic_append(self.log_path, text)
        self._written = len(self.history)

    def epoch(self, stats: dict[str, Any]) -> None:
        self.record(stats)
        self.write()

    def close(self) -> None:
        self._tensorboard(lambda writer: writer.flush())  # the last events' errors, while they can be reported
        self._tensorboard(lambda writer: writer.close())
        self.writer = None


def _leave_tensorboard_thread_errors_to_runlog() -> None:
    """TensorBoard writes its event file in a thread of its own. An ``OSError`` there (a full disk)
    would print that thread's traceback, then reach RunLog again at its next TensorBoard call, which
    reports it in one line: such errors are left to that call. Installed once per process."""
    previous = threading.excepthook
    if getattr(previous, "leaves_tensorboard_errors_to_runlog", False):
        return

    def hook(args: threading.ExceptHookArgs) -> None:
        from_tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if not (from_tensorboard and issubclass(args.exc_type, OSError)):
            previous(args)

    hook.leaves_tensorboard_errors_to_runlog = True
    threading.excepthook = hook
