"""What a run must not accumulate from one epoch to the next. Pre-training runs for 800 to 1600
epochs: an open file, a thread or a worker process left behind per epoch ends such a run days in,
long after a short run looked fine. After the first epoch (which starts the persistent loader
workers and the TensorBoard writer) the counts stay put however many epochs follow."""

import gc
import multiprocessing
import os
import threading
import time
from pathlib import Path

import pytest
from helpers import make_split, run_pretrain

from util.train.checkpointer import Checkpointer

EPOCHS = 4


def held_resources() -> tuple[int, int, int]:
    """Open file descriptors, threads and live child processes of this process."""
    gc.collect()  # what only a cycle still holds is not kept by the run
    return len(os.listdir("/proc/self/fd")), threading.active_count(), len(multiprocessing.active_children())


def settled(expected: tuple[int, int, int], seconds: float = 10.0) -> tuple[int, int, int]:
    """``held_resources()`` once it equals ``expected``, or after ``seconds``: a loader shut down a
    moment ago may still be closing its queues' threads and pipes, which is not a leak."""
    deadline = time.monotonic() + seconds
    while (held := held_resources()) != expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return held


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_epochs_leave_no_files_threads_or_processes_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Everything that runs per epoch at once: persistent loader workers, the k-NN monitor's loaders
    (workers started and stopped each time), the picture, TensorBoard, mid-epoch checkpoints, pruning."""
    data, out = make_split(tmp_path / "data", 8, 4), tmp_path / "run"
    after_epoch: list[tuple[int, int, int]] = []
    end_epoch = Checkpointer.end_epoch

    def counting(self: Checkpointer, epoch: int, line: dict | None = None) -> None:
        end_epoch(self, epoch, line)
        first_steady = after_epoch[1] if len(after_epoch) > 1 else None
        after_epoch.append(held_resources() if first_steady is None else settled(first_steady))

    monkeypatch.setattr(Checkpointer, "end_epoch", counting)
    flags = ["--epochs", str(EPOCHS), "--model", "mae_vit_mini_patch4", "--batch_size", "8", "--num_workers", "2"]
    flags += ["--knn_data_path", str(data), "--knn_freq", "1", "--knn_k", "5", "--vis_freq", "1"]
    flags += ["--ckpt_every_steps", "1", "--keep_last", "1", "--save_freq", "100"]
    run_pretrain(data, out, *flags)

    assert len(after_epoch) == EPOCHS
    assert after_epoch[2:] == [after_epoch[1]] * (EPOCHS - 2), "(fds, threads, children) after each epoch"
    assert after_epoch[1][2] == 2  # the training loader's two persistent workers, and nothing else
    # The folder grows by one picture an epoch: mid-epoch and older checkpoints are pruned, nothing temporary stays.
    names = {p.name for p in out.iterdir() if not p.name.startswith("events.out.tfevents.")}
    pictures = {f"reconstruction-{e}.png" for e in range(EPOCHS)}
    assert names == {"log.txt", "checkpoint-0.pth", f"checkpoint-{EPOCHS - 1}.pth", *pictures}
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
