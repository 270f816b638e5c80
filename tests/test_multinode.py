"""A job on several nodes: each rank reads its own node's view of the files. Simulated with two gloo
ranks forked from this process (helpers.run_ranks), each in a folder of its own that stands for its
node's disk, and the same relative paths: a node's stale view of a shared folder (an NFS client's
cache) or a node-local --output_dir. Every rank must start from the same checkpoint and data, or all
stop in one line that says so: a rank that differs alone is hidden by DDP (it copies rank 0's weights)
and diverges silently, or hangs at the end."""

import datetime
import os
import shutil
import signal
import threading
import time
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import run_ranks, serve

import main_finetune
from util.checkpoint import opening
from util.checkpoint import resume as resuming
from util.checkpoint import state as checkpoint
from util.checkpoint.download import AFRESH, cached_path
from util.checkpoint.state import TrainState, save_checkpoint
from util.cli.args import check_same_flags
from util.cli.errors import UserError
from util.train import distributed, run, waiting
from util.train.precision import LossScaler


def _checkpoints(folder: Path) -> dict[str, Path]:
    """checkpoint-0.pth, then checkpoint-1-step4.pth a step later, in ``folder``; returns name -> path."""
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    model = torch.nn.Linear(2, 2)
    args = Namespace(output_dir=str(folder), keep_last=0, save_freq=1, epochs=2, device="cpu")
    args.__dict__.update(batch_size=8, world_size=2, accum_iter=1)
    state = TrainState(model, torch.optim.AdamW(model.parameters(), lr=0.1), LossScaler("fp32"), args)
    for epoch, step in ((0, None), (1, 4)):
        model(torch.ones(1, 2)).sum().backward()
        state.optimizer.step()
        save_checkpoint(state, epoch, step)
    return {p.name: p for p in folder.glob("checkpoint-*.pth")}


def _on_nodes(tmp_path: Path, body, exit_codes=(0, 0), join: bool = True) -> list[str]:
    """``body()`` on two ranks, rank r working in ``tmp_path/node<r>`` (its node's files), in a process
    group (``join``: made here; else ``body`` makes it); their outputs."""

    def rank_main() -> None:
        os.chdir(tmp_path / f"node{os.environ['RANK']}")
        if join:
            distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        try:
            body()
        finally:
            distributed.cleanup()

    return run_ranks(rank_main, tmp_path / "ranks", exit_codes=exit_codes, timeout=120)


def _resumes(args: Namespace) -> None:
    opened = resuming.open_resume(args)
    print(f"resumes {opened.path}: epoch {opened.ckpt['epoch']}, step {opened.ckpt['step']}")


def test_every_rank_resumes_the_checkpoint_rank_0_chooses_though_a_nodes_view_is_stale(tmp_path):
    """Node 1's view of the shared --output_dir lacks the newest checkpoint for a while (an NFS client
    caches a folder's listing): it resumed checkpoint-0.pth while rank 0 resumed checkpoint-1-step4.pth.
    It now waits for the checkpoint rank 0 chose."""
    made = _checkpoints(tmp_path / "node0" / "out")
    (tmp_path / "node1" / "out").mkdir(parents=True)
    shutil.copy(made["checkpoint-0.pth"], tmp_path / "node1" / "out")

    def body() -> None:
        if distributed.rank() == 1:  # the newest shows on node 1 a little later
            newest = tmp_path / "node1" / "out" / "checkpoint-1-step4.pth"
            threading.Timer(1.5, shutil.copy, (made["checkpoint-1-step4.pth"], newest)).start()
        _resumes(Namespace(resume="auto", output_dir="out", eval=False))

    logs = _on_nodes(tmp_path, body)
    for log in logs:
        assert "resumes out/checkpoint-1-step4.pth: epoch 1, step 4" in log, log
    assert "rank 1: waiting up to 60 s for out/checkpoint-1-step4.pth, which rank 0 resumes, to show here" in logs[1]


def test_a_node_that_cannot_see_the_checkpoint_rank_0_resumes_stops_every_rank_in_one_line(tmp_path, monkeypatch):
    """--output_dir on each node's local disk: node 1's holds nothing, and its rank started from
    scratch beside rank 0's resumed one."""
    _checkpoints(tmp_path / "node0" / "out")
    (tmp_path / "node1" / "out").mkdir(parents=True)
    monkeypatch.setattr(resuming, "APPEAR_WAIT_S", 1.0)  # inherited by the forked ranks

    logs = _on_nodes(tmp_path, lambda: _resumes(Namespace(resume="auto", output_dir="out", eval=False)), (2, 2))
    expected = (
        "error: --resume auto out/checkpoint-1-step4.pth: rank(s) 1 of 2 cannot read it (checkpoint "
        "out/checkpoint-1-step4.pth does not exist; check its path), rank(s) 0 can: every node of the job must "
        "see the same files; put --output_dir on storage every node of the job shares, not on a node's local disk\n"
    )
    for log in logs:
        assert log.endswith(expected), log


@pytest.mark.parametrize("flag", ["--resume", "--finetune"])
def test_a_checkpoint_path_that_is_another_file_on_another_node_stops_every_rank(tmp_path, flag):
    """The same relative path names another checkpoint on node 1 (a local copy of an older one)."""
    made = _checkpoints(tmp_path / "node0" / "out")
    (tmp_path / "node1" / "out").mkdir(parents=True)
    shutil.copy(made["checkpoint-0.pth"], tmp_path / "node1" / "out" / "checkpoint-1-step4.pth")
    path = "out/checkpoint-1-step4.pth"

    def body() -> None:
        if flag == "--resume":
            _resumes(Namespace(resume=path, output_dir="out", eval=False))
        else:  # as fine-tuning starts (its flags filled from the checkpoint it starts from)
            flags = ["--finetune", path, "--model", "vit_mini_patch4", "--output_dir", str(tmp_path / "ft")]
            flags += ["--log_dir", ""]
            run.start(main_finetune.get_args_parser().parse_args([*flags, "--device", "cpu"]))

    logs = _on_nodes(tmp_path, body, (2, 2), join=flag == "--resume")
    size0, size1 = (os.path.getsize(tmp_path / f"node{r}" / path) for r in (0, 1))
    expected = (
        f"error: {flag} {path} is not the same file on every rank (rank 0: epoch 1 iteration 4, {size0} bytes; "
        f"rank 1: epoch 0, {size1} bytes): every node of the job must see the same files; give a checkpoint on "
        f"storage every node of the job shares, or the same file on each node\n"
    )
    for log in logs:
        assert log.endswith(expected), log


def test_a_checkpoint_no_rank_can_read_is_each_ranks_own_error(tmp_path):
    """As a single process says it: nothing about nodes, which are not the cause."""
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    started = time.monotonic()
    logs = _on_nodes(tmp_path, lambda: _resumes(Namespace(resume="none.pth", output_dir="", eval=False)), (2, 2))
    assert all(log.endswith("error: checkpoint none.pth does not exist; check its path\n") for log in logs), logs
    assert time.monotonic() - started < 60


def test_an_output_dir_on_each_nodes_own_disk_stops_every_training_rank_at_start(tmp_path, monkeypatch):
    """Only rank 0 writes there, so such a job trained; continued with --resume auto on other nodes (a
    SLURM requeue) it found no checkpoint where rank 0 landed and started from scratch."""
    import main_pretrain

    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    monkeypatch.setattr(run, "SEEN_WAIT_S", 0.5, raising=False)
    flags = ["--output_dir", "out", "--log_dir", "", "--resume", "auto", "--device", "cpu"]
    args = main_pretrain.get_args_parser().parse_args(flags)

    logs = _on_nodes(tmp_path, lambda: run.start(args), (2, 2), join=False)
    expected = (
        "error: --output_dir out: rank(s) 1 of 2 do not see the files rank 0 writes there (a folder on each node's "
        "local disk?), so a job continued with --resume auto would not find its checkpoints on every node; put "
        "--output_dir on storage every node of the job shares\n"
    )
    assert all(log.endswith(expected) for log in logs), logs
    assert os.listdir(tmp_path / "node0" / "out") == [], "rank 0 removes the file it made"


def test_a_refusal_of_rank_0_at_start_stops_every_rank_in_its_line(tmp_path):
    """Rank 0 alone checks --output_dir (a folder holding an earlier run's checkpoints, here): the other ranks
    went on to their next collective and ended in gloo's 'Connection closed by peer' traceback once rank 0
    exited (with NCCL they wait for its watchdog unless a launcher stops them) (found by a review)."""
    import main_pretrain

    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    out = tmp_path / "shared"
    _checkpoints(out)
    args = main_pretrain.get_args_parser().parse_args(["--output_dir", str(out), "--log_dir", "", "--device", "cpu"])
    logs = _on_nodes(tmp_path, lambda: run.start(args), (2, 2), join=False)
    expected = (
        f"error: --output_dir {out} holds the checkpoints of an earlier run (checkpoint-1-step4.pth and 1 more), "
        f"which this run would replace or delete: continue that run with --resume auto, or give another --output_dir\n"
    )
    assert all(log.endswith(expected) and "Traceback" not in log for log in logs), logs


def test_a_shared_output_dir_passes_and_keeps_no_marker(tmp_path):
    import main_pretrain

    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    out = tmp_path / "shared"
    out.mkdir()
    (out / (run.SEEN_MARKER + ".tmp1")).touch()  # left by a killed run (process 1 is not this one)
    args = main_pretrain.get_args_parser().parse_args(["--output_dir", str(out), "--log_dir", "", "--device", "cpu"])
    logs = _on_nodes(tmp_path, lambda: print(f"started with output in {run.start(args).args.output_dir}"), join=False)
    assert all(f"started with output in {out}" in log for log in logs), logs
    assert os.listdir(out) == []


# ---------------------------------------------------------------------------------------------
# The data each node lists
def _lists(body_of_data) -> None:
    dataset = body_of_data()
    print(f"lists {len(dataset)} images")


@pytest.mark.parametrize("node1", ["one fewer", "one renamed", "a class folder renamed"])
def test_ranks_that_list_other_pretraining_images_stop_in_one_line(tmp_path, node1):
    """Node 1's copy of the data lacks an image (other step counts: the job hung at the end of the first
    epoch until the 30-minute collective timeout), or names one otherwise (the same counts: each rank
    shared out another list, silently), or names a class folder otherwise: 'cat' as 'zebra' puts the
    ship images first, the same file names (0000.jpg, ...) in the same order, which the digest of the
    names alone passed."""
    from helpers import make_dataset

    from util.data.datasets import pretrain_dataset

    make_dataset(tmp_path / "node0" / "data", 2)
    data1 = make_dataset(tmp_path / "node1" / "data", 2)
    last = sorted(data1.rglob("*.jpg"))[-1]
    if node1 == "one fewer":
        last.unlink()
    elif node1 == "one renamed":
        last.rename(last.with_name("z" + last.name))
    else:
        (data1 / "cat").rename(data1 / "zebra")
    logs = _on_nodes(tmp_path, lambda: _lists(lambda: pretrain_dataset("data", None)), (2, 2))
    differs = "5 images, rank 0 6" if node1 == "one fewer" else "other images than rank 0 (6 each)"
    expected = (
        f"error: --data_path data: rank 1 of 2 lists {differs}: every node of the job must see the same data; put "
        f"it on storage every node shares, or the same copy at the same path on each node\n"
    )
    assert all(log.endswith(expected) for log in logs), logs


def test_ranks_that_list_other_validation_images_stop_in_one_line(tmp_path):
    """Fine-tuning's val/ split (sharded by --dist_eval: the accuracies summed over other lists) and
    the k-NN monitor's (gathered features of other counts: a hang) read the same way."""
    from helpers import make_split

    from util.data.datasets import classification_splits

    for r in (0, 1):
        make_split(tmp_path / f"node{r}" / "data", 2, 2)
    next((tmp_path / "node1" / "data" / "val" / "cat").glob("*.jpg")).unlink()
    logs = _on_nodes(tmp_path, lambda: classification_splits("data", None, None, None, "--knn_data_path"), (2, 2))
    expected = "error: --knn_data_path data (val): rank 1 of 2 lists 5 images, rank 0 6: every node of the job"
    assert all(expected in log for log in logs), logs


def test_ranks_that_list_the_same_images_go_on(tmp_path):
    from helpers import make_dataset

    from util.data.datasets import pretrain_dataset

    for r in (0, 1):
        make_dataset(tmp_path / f"node{r}" / "data", 2)
    logs = _on_nodes(tmp_path, lambda: _lists(lambda: pretrain_dataset("data", None)))
    assert all("lists 6 images" in log for log in logs), logs


# ---------------------------------------------------------------------------------------------
# A stop that reaches one node
def test_a_stop_signal_on_one_node_names_the_checkpoint_in_every_ranks_log(tmp_path):
    """SLURM or a scancel may signal one node's processes only (or they get it first): every rank stops
    after rank 0's checkpoint, and each node's log names it. Rank 1 said 'nothing was saved, since the
    run has no --output_dir', though it had one and rank 0 had just written it."""
    import signal

    from helpers import counting_step, make_dataset, pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 16), tmp_path / "out"  # 3 iterations an epoch on 2 ranks
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--print_freq", "1"]
    args = pretrain_args(data, out, *flags, "--vis_freq", "0", "--log_dir", "")

    def rank_main() -> None:
        if os.environ["RANK"] == "1":  # its node's launcher passes a SIGTERM on after its first step

            def stop(optimizer, k):
                if k == 1:
                    os.kill(os.getpid(), signal.SIGTERM)

            torch.optim.AdamW.step = counting_step(stop)
        pretrain_in_process(args)

    logs = run_ranks(lambda: rank_main(), tmp_path / "ranks", exit_codes=(143, 143), timeout=120)
    expected = f"\nstopped on request after writing {out / 'checkpoint-0-step1.pth'}; continue with --resume auto\n"
    assert all(expected in log for log in logs), logs
    assert "received SIGTERM: checkpointing at the next check point" in logs[1]


def test_a_submitit_signal_that_reaches_another_rank_only_still_has_rank_0_requeue_the_job(tmp_path):
    """A two-task submitit job on SLURM (faked: its variables, a fake scontrol), whose SIGUSR2 reaches rank 1
    only (SLURM's signal reaches each node on its own time): all ranks stop after rank 0's checkpoint, and
    rank 0, which alone requeues a submitit job, hands the signal to submitit all the same. Rank 0 exited
    143 without requeueing, and the job ended there."""
    pytest.importorskip("submitit")
    from helpers import counting_step, make_dataset, pretrain_args
    from submitit.core.job_environment import JobEnvironment
    from submitit.core.utils import DelayedSubmission, JobPaths

    from util.cli.launcher import Trainer

    data, jobs, calls = make_dataset(tmp_path / "data", 16), tmp_path / "jobs", tmp_path / "scontrol.log"
    (tmp_path / "bin").mkdir()
    scontrol = tmp_path / "bin" / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    scontrol.chmod(0o755)
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--print_freq", "1"]
    args = pretrain_args(data, jobs / "%j", *flags, "--vis_freq", "0", "--log_dir", "")

    def rank_main() -> None:
        rank = os.environ["RANK"]
        os.environ.update(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_PROCID=rank, SLURM_LOCALID=rank)
        os.environ.update(SLURM_NTASKS="2", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="localhost")
        os.environ["PATH"] = f"{tmp_path / 'bin'}:{os.environ['PATH']}"
        delayed = DelayedSubmission(Trainer("main_pretrain", args))
        delayed.set_timeout(60, 3)
        JobEnvironment()._handle_signals(JobPaths(jobs / "%j", job_id="4242", task_id=int(rank)), delayed)
        if rank == "1":

            def stop(optimizer, k):
                if k == 1:
                    os.kill(os.getpid(), signal.SIGUSR2)

            torch.optim.AdamW.step = counting_step(stop)
        delayed.result()

    # submitit's handler exits rank 0 with -1 once it requeued; rank 1 exits as stopped by SIGUSR2
    logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=(255, 128 + signal.SIGUSR2), timeout=120)
    assert calls.read_text() == "requeue 4242\n", logs[0][-3000:]
    assert (jobs / "4242" / "checkpoint-0-step1.pth").is_file()
    requeued = DelayedSubmission.load(jobs / "4242" / "4242_submitted.pkl")
    assert requeued.function.args.resume == "auto" and requeued._timeout_countdown == 3


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_in_its_line(tmp_path):
    """A stop asked for on node 1, whose checkpoint rank 0 cannot write (a full disk): rank 0 stopped in
    its line, and rank 1, which had no collective left to find out, said 'stopped on request after writing
    .../checkpoint-0-step1.pth', a file that does not exist, and exited as stopped (143, not 2)."""
    import errno
    import signal

    from helpers import counting_step, make_dataset, pretrain_args, pretrain_in_process

    data, out = make_dataset(tmp_path / "data", 16), tmp_path / "out"  # 3 iterations an epoch on 2 ranks
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--print_freq", "1"]
    args = pretrain_args(data, out, *flags, "--vis_freq", "0", "--log_dir", "")

    def full_disk(obj: object, path: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", path)

    def rank_main() -> None:
        if os.environ["RANK"] == "0":
            checkpoint.atomic_save = full_disk
        else:
            torch.optim.AdamW.step = counting_step(lambda _, k: k == 1 and os.kill(os.getpid(), signal.SIGTERM))
        pretrain_in_process(args)

    logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=(2, 2), timeout=120)
    written = f"error: cannot write checkpoint {out / 'checkpoint-0-step1.pth'}: No space left on device"
    assert all(written in log and "stopped on request" not in log for log in logs), logs
    assert not list(out.glob("checkpoint-*"))


def test_a_finetune_checkpoint_among_the_outputs_stops_every_rank_in_its_line(tmp_path):
    """--finetune out/checkpoint-0.pth --output_dir out (resumed: a new run is refused the folder anyway): rank 0
    alone checked it, and the other ranks ended in gloo's traceback once it exited."""
    import main_finetune

    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()
    out = tmp_path / "shared"
    made = _checkpoints(out)
    flags = [
        "--output_dir",
        str(out),
        "--log_dir",
        "",
        "--device",
        "cpu",
        "--resume",
        str(made["checkpoint-1-step4.pth"]),
    ]
    args = main_finetune.get_args_parser().parse_args([*flags, "--finetune", str(made["checkpoint-0.pth"])])
    logs = _on_nodes(tmp_path, lambda: run.start(args), (2, 2), join=False)
    expected = f"error: --finetune {made['checkpoint-0.pth']} is a checkpoint in --output_dir {out}, where this run "
    assert all(expected in log and "Traceback" not in log for log in logs), logs


def _download_on_three_ranks(
    tmp_path: Path, monkeypatch, name: str, exit_code: int | tuple[int, ...], cached: bytes | None = None
) -> tuple[list[str], list[str], str]:
    """Ranks 0 and 1 share a torch.hub cache (one node, or a shared home), rank 2 has its own (another
    node's disk); each opens ``name`` from a local HTTP server as --finetune does, which serves
    weights.pth and truncated.pth (its first half). ``cached``: the shared cache holds these bytes as
    the URL's copy already. Their outputs, the paths the server was asked for, and the URL."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    (tmp_path / "served").mkdir()
    torch.save({"model": {"w": torch.arange(4.0)}}, tmp_path / "served" / "weights.pth")
    whole = (tmp_path / "served" / "weights.pth").read_bytes()
    (tmp_path / "served" / "truncated.pth").write_bytes(whole[: len(whole) // 2])

    def rank_main() -> None:
        own = os.environ["RANK"] == "2"
        os.environ["TORCH_HOME"] = str(tmp_path / ("cache-of-rank-2" if own else "shared-cache"))
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        try:
            opened = opening.open_on_every_rank(lambda: opening.open_checkpoint(url), url, "--finetune")
            print("loaded", opened.ckpt["model"]["w"].tolist())
        finally:
            distributed.cleanup()

    with serve(tmp_path / "served") as (address, asked):
        url = f"{address}/{name}"
        if cached is not None:
            monkeypatch.setenv("TORCH_HOME", str(tmp_path / "shared-cache"))
            Path(cached_path(url)).parent.mkdir(parents=True)
            Path(cached_path(url)).write_bytes(cached)
        codes = exit_code if isinstance(exit_code, tuple) else (exit_code,) * 3
        logs = run_ranks(rank_main, tmp_path / "ranks", world_size=3, exit_codes=codes, timeout=120)
    return logs, asked, url


def test_a_url_is_downloaded_once_per_cache_not_once_per_rank(tmp_path, monkeypatch):
    """Every rank downloaded it at once: eight ranks of a node fetched the same file eight times."""
    logs, asked, _ = _download_on_three_ranks(tmp_path, monkeypatch, "weights.pth", 0)
    assert asked == ["/weights.pth"] * 2, asked  # the shared cache once, rank 2's own once
    for log in logs:
        assert "loaded [0.0, 1.0, 2.0, 3.0]" in log, log
    assert len(list((tmp_path / "shared-cache").rglob("weights.pth"))) == 1


def test_a_failed_download_stops_every_rank_in_rank_0s_line(tmp_path, monkeypatch):
    logs, asked, url = _download_on_three_ranks(tmp_path, monkeypatch, "missing.pth", 2)
    assert asked == ["/missing.pth"], asked  # the other ranks did not try again
    for log in logs:
        assert log.endswith(
            f"error: --finetune: rank 0 of 3: checkpoint {url} could not be downloaded (HTTPError: HTTP Error 404: "
            f"File not found); download it yourself and give the file\n"
        ), log


def test_a_damaged_download_is_asked_for_once_and_stops_every_rank_in_one_line(tmp_path, monkeypatch):
    """Rank 0 removed its damaged copy when it failed to load it, while rank 1, which shares its cache,
    read it: rank 1 downloaded it again (a third request) or found no such file, and the advice, to use
    an earlier checkpoint or write it again, fitted a file, not a URL."""
    logs, asked, url = _download_on_three_ranks(tmp_path, monkeypatch, "truncated.pth", 2)
    assert asked == ["/truncated.pth"], asked  # rank 0's download only: the others waited for its check
    for log in logs:
        assert log.endswith(
            f"error: --finetune: rank 0 of 3: checkpoint {url} is truncated or not a PyTorch checkpoint; its "
            f"downloaded copy was removed: run again to download it afresh, or download it yourself and give the file\n"
        ), log
    assert not list(tmp_path.glob("*cache*/**/truncated.pth"))


def test_a_damaged_copy_already_cached_is_named_and_left_for_the_ranks_reading_it(tmp_path, monkeypatch):
    """A copy in the cache before the run (one killed between its download and its first load) is read by
    every rank that shares the cache: none removes it under the others. Rank 2, with a cache of its own,
    downloads a good copy; the line says which ranks cannot read it and what to do, not to share storage."""
    page = b"<html>sign in</html>"
    logs, asked, url = _download_on_three_ranks(tmp_path, monkeypatch, "weights.pth", 2, cached=page)
    assert asked == ["/weights.pth"], asked  # rank 2's
    copy = next((tmp_path / "shared-cache").rglob("weights.pth"))
    expected = (
        f"error: --finetune {url}: rank(s) 0, 1 of 3 cannot read it (checkpoint {url} is truncated or not a "
        f"PyTorch checkpoint (its copy in torch.hub's cache, {copy}); remove that file and run again to download "
        f"it afresh, or download it yourself and give the file), rank(s) 2 can\n"
    )
    assert all(log.endswith(expected) for log in logs), logs
    assert copy.read_bytes() == page


def _download_on_two_ranks(
    tmp_path: Path,
    monkeypatch,
    name: str,
    exit_codes: tuple[int, int],
    pace_s: float = 0.0,
    own_caches: bool = False,
    joined: Callable[[], None] = lambda: None,
    query: str = "",
) -> tuple[list[str], list[str], str]:
    """Two ranks open ``name`` (weights.pth, 4 MB, or truncated.pth, its first half) from a local HTTP server
    that pauses ``pace_s`` before each 128 KiB, with a collective timeout of 3 s: a download of minutes
    against one of 30 min, scaled down (with a margin: every collective of the group has that timeout, on a
    machine busy with other tests). They share a torch.hub cache unless ``own_caches``; each calls
    ``joined()`` once in the group; ``query`` ends the URL. Their outputs, the paths asked for, and the URL."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "COLLECTIVE_TIMEOUT", datetime.timedelta(seconds=3))
    monkeypatch.setattr(distributed, "NOTICE_AFTER_S", 0.5)
    monkeypatch.setattr(waiting, "WAIT_NOTICE_EVERY_S", 1.0)
    (tmp_path / "served").mkdir()
    torch.save({"model": {"w": torch.arange(1e6)}}, tmp_path / "served" / "weights.pth")
    whole = (tmp_path / "served" / "weights.pth").read_bytes()
    (tmp_path / "served" / "truncated.pth").write_bytes(whole[: len(whole) // 2])

    def rank_main() -> None:
        os.environ["TORCH_HOME"] = str(tmp_path / (f"cache{os.environ['RANK']}" if own_caches else "cache"))
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        joined()
        opened = opening.open_on_every_rank(lambda: opening.open_checkpoint(url), url, "--finetune")
        print("loaded", opened.ckpt["model"]["w"][-1].item())
        distributed.cleanup()  # not on an error: run_cli tells a peer's stop by the group, then ends it

    with serve(tmp_path / "served", pace_s) as (address, asked):
        url = f"{address}/{name}{query}"
        logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=exit_codes, timeout=60)
    return logs, asked, url


def test_the_other_ranks_wait_for_a_download_longer_than_a_collective_timeout_while_it_gets_on(tmp_path, monkeypatch):
    """Rank 1 waited for rank 0's download in a collective, whose timeout (30 min; 3 s here) ended it while
    rank 0 was downloading a large release at a slow link (here 4 MB in about 6 s). The notice names the URL
    without the signature of its query (it printed it verbatim), which the download used."""
    query = "?X-Amz-Signature=sig-0123secret"
    logs, asked, url = _download_on_two_ranks(tmp_path, monkeypatch, "weights.pth", (0, 0), 0.2, query=query)
    assert asked == [f"/weights.pth{query}"], asked
    assert all("loaded 999999.0" in log and "sig-0123secret" not in log for log in logs), logs
    notice = (
        f"rank 1 of 2: waiting for rank 0 to download {url.removesuffix(query)}?X-Amz-Signature=*** for --finetune ("
    )
    assert notice in logs[1] and "MB so far; giving up after 3 s without progress)" in logs[1], logs[1]
    assert "waiting for" not in logs[0], logs[0]  # the downloader says nothing of the kind


def test_keys_an_earlier_attempt_left_in_the_store_do_not_end_the_wait(tmp_path, monkeypatch):
    """torchrun's store outlives the processes it restarts, and across nodes no key prefix tells the attempts
    apart (generation_store): the keys of an earlier attempt's wait, which had ended, ended rank 1's wait at
    once, and it sat in the next collective while rank 0 downloaded, timed out by it (3 s here)."""

    def earlier_attempt() -> None:  # what its first waits left: a download that failed, each "done"
        if distributed.rank() == 0:
            for call in range(3):
                distributed.rendezvous_store().add(f"{waiting.WAIT_KEYS}/{call}/done", 1)
        distributed.gather(None)  # rank 1 waits after they are there

    logs, asked, _ = _download_on_two_ranks(tmp_path, monkeypatch, "weights.pth", (0, 0), 0.2, joined=earlier_attempt)
    assert asked == ["/weights.pth"], asked
    assert all("loaded 999999.0" in log for log in logs), logs


def test_a_slow_download_that_is_damaged_still_stops_both_ranks_in_its_line(tmp_path, monkeypatch):
    logs, asked, url = _download_on_two_ranks(tmp_path, monkeypatch, "truncated.pth", (2, 2), pace_s=0.3)
    assert asked == ["/truncated.pth"], asked
    line = f"error: --finetune: rank 0 of 2: checkpoint {url} is truncated or not a PyTorch checkpoint; "
    assert all(_errors(log) == [f"{line}{AFRESH}"] for log in logs), logs


def test_a_downloader_that_dies_is_noticed_once_it_gets_no_further_for_the_collective_timeout(tmp_path, monkeypatch):
    """Rank 1 (a cache of its own) is killed as it starts to download, while rank 0, which serves the
    store, waits for it: rank 0 gives up after 3 s without progress, in one line, not a hang."""
    _killed_as_it_downloads(monkeypatch, rank=1)
    started = time.monotonic()
    logs, asked, url = _download_on_two_ranks(
        tmp_path, monkeypatch, "weights.pth", (2, -signal.SIGKILL), own_caches=True
    )
    assert time.monotonic() - started < 20
    assert _errors(logs[0]) == [
        f"error: rank 0 of 2 waited for rank 1 to download {url} for --finetune, which got no further for 3 s "
        "(0.0 MB so far): it stopped or is stuck; see its output, and run again"
    ], logs[0]


def test_a_downloader_that_serves_the_store_and_dies_stops_the_others_at_once(tmp_path, monkeypatch):
    """Rank 0 serves the rendezvous store outside torchrun: killed while rank 1 waits on that store, rank 1
    says that another process stopped, as it did in the collective before, and does not hang."""
    _killed_as_it_downloads(monkeypatch, rank=0)
    started = time.monotonic()
    logs, _, _ = _download_on_two_ranks(tmp_path, monkeypatch, "weights.pth", (-signal.SIGKILL, 1))
    assert time.monotonic() - started < 20
    assert _errors(logs[1]) == [
        "error: another process of this job stopped, so rank 1 of 2 cannot go on; restart the whole job with "
        "--resume auto to continue from its last checkpoint"
    ], logs[1]


def _errors(log: str) -> list[str]:
    """A rank's error lines: here the note that the test's group ended may follow the last."""
    return [line for line in log.splitlines() if line.startswith("error:")]


def _killed_as_it_downloads(monkeypatch, rank: int) -> None:
    """Rank ``rank`` is killed (SIGKILL) as it starts to download."""
    real = torch.hub.download_url_to_file

    def killed(*args, **kwargs) -> None:
        if os.environ["RANK"] == str(rank):
            os.kill(os.getpid(), signal.SIGKILL)
        real(*args, **kwargs)

    monkeypatch.setattr(torch.hub, "download_url_to_file", killed)


# ---------------------------------------------------------------------------------------------
# The command each node's torchrun was given
def _started_with(tmp_path: Path, flags_of_rank, exit_codes=(0, 0)) -> list[str]:
    """``run.start`` of pre-training on two ranks, rank r with ``flags_of_rank(r)`` (a list of flags); the logs."""
    import main_pretrain

    for r in (0, 1):
        (tmp_path / f"node{r}" / "data").mkdir(parents=True)

    def body() -> None:
        flags = ["--output_dir", str(tmp_path / "out"), "--device", "cpu", *flags_of_rank(int(os.environ["RANK"]))]
        started = run.start(main_pretrain.get_args_parser().parse_args(flags))
        print(f"started with lr {started.args.lr:.3e}")

    return _on_nodes(tmp_path, body, exit_codes, join=False)


def test_nodes_started_with_other_training_flags_stop_every_rank_in_one_line(tmp_path):
    """Node 1's command has another --blr and --seed: its rank trained on with its own lr (DDP averages the
    gradients, each rank applies them its own way), its own sample order, and rank 0 saved only its own weights."""
    flags = {0: ["--blr", "1.5e-4"], 1: ["--blr", "1e-3", "--seed", "1"]}
    logs = _started_with(tmp_path, flags.get, (2, 2))
    expected = (
        "error: the processes of this job were started with other flags: --blr 0.00015 on rank 0, --blr 0.001 on "
        "rank 1 (and 1 more: --seed); start every node with the same command (it may differ only in --num_workers, "
        "--pin_mem, --log_dir, and in the paths it gives to the same files)\n"
    )
    for log in logs:
        assert log.endswith(expected) and "started with lr" not in log, log


def test_nodes_may_name_their_own_paths_and_resources(tmp_path):
    own = {
        0: ["--data_path", "data", "--num_workers", "1", "--log_dir", str(tmp_path / "tb")],
        1: ["--data_path", "./data", "--no_pin_mem", "--log_dir", ""],
    }
    for log in _started_with(tmp_path, own.get):
        assert "started with lr 5.000e-04" in log, log  # the default --blr 1e-3 x (64 x 2 ranks) / 256


def test_a_path_given_on_one_node_only_is_refused_as_other_flags():
    """A rank that alone resumes (or starts from a checkpoint, or runs the k-NN monitor) leaves the others waiting
    in a collective it never joins; 'auto' is not a path."""
    ours = {"resume": "auto", "input_size": [224, 160], "compile": False}
    for theirs, shown in (
        ({"resume": "", "input_size": [224, 160], "compile": False}, "no --resume on rank 2"),
        ({"resume": "out/checkpoint-3.pth", "input_size": [224, 160], "compile": False}, "--resume PATH on rank 2"),
        ({"resume": "auto", "input_size": [160, 224], "compile": False}, "--input_size 160 224 on rank 2"),
        ({"resume": "auto", "input_size": [224, 160], "compile": True}, "--compile on rank 2"),
    ):
        with pytest.raises(UserError, match=f"other flags: .* on rank 0, {shown}; start every node"):
            check_same_flags([ours, ours, theirs])  # rank 2 differs, rank 1 does not
    check_same_flags([ours, {**ours, "local_rank": 1, "pin_mem": False, "dist_url": "tcp://node1:29500"}])


def test_a_restart_that_only_some_nodes_count_resumes_auto_on_every_rank(tmp_path):
    """torchrun counts a restart per node, and only its own: a node whose processes failed restarts them with
    TORCHELASTIC_RESTART_COUNT 1, while a node that saw the others waiting (its processes still in a collective)
    restarts its own as a membership change, which torchrun does not count (0). Decided on each node, the ranks
    that counted a restart asked rank 0 whether the run had saved while the others went on to the next collective:
    the job hung, or its ranks resumed different checkpoints. Every rank now continues with --resume auto."""
    _checkpoints(tmp_path / "out")
    for r in (0, 1):
        (tmp_path / f"node{r}").mkdir()

    def body() -> None:
        if distributed.rank() == 1:  # node 1 counted the restart, node 0 (rank 0) did not
            os.environ["TORCHELASTIC_RESTART_COUNT"] = "1"
        args = Namespace(resume="", output_dir=str(tmp_path / "out"), eval=False)
        args.resume = run.resume_after_restart(args, training=True)
        print(f"ranks resume: {distributed.gather(args.resume)}")

    for log in _on_nodes(tmp_path, body):
        assert "ranks resume: ['auto', 'auto']" in log, log


def test_nodes_whose_gpus_choose_another_precision_stop_every_rank_in_one_line(tmp_path):
    """--precision auto is each node's own: bf16 on GPUs that compute in it, fp16 on older ones (V100, T4). A job
    on both kinds trained in two precisions, the fp16 ranks skipping the steps their loss scaler found overflowing
    while the bf16 ranks took them, so the ranks' weights parted, without a word. Node 1's GPUs are older here."""

    def flags_of_rank(rank: int) -> list[str]:
        if rank == 1:
            run.resolve_precision = lambda precision, device: "fp16"  # this forked rank's view of its GPUs
        return []

    logs = _started_with(tmp_path, flags_of_rank, (2, 2))
    expected = (
        "error: --precision auto chose fp32 on rank 0 and fp16 on rank 1, whose GPUs differ: give every node the "
        "same --precision (fp16 runs on every GPU)\n"
    )
    for log in logs:
        assert log.endswith(expected) and "started with lr" not in log, log
