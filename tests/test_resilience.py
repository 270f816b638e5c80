"""Runs that survive a real process's end: kill -9 between a checkpoint's write and its rename,
SIGTERM to the process group (DataLoader workers included), and submitit's local executor
(preempted, then requeued). Every interrupted run must end bitwise identical to one that was
never interrupted (the session's ``pretrain_reference``, run on the command line).

The killed runs are real processes, forked from this one (the signals need a process, not a fresh
interpreter); the resumed runs, which only need the files the killed ones left, run in this
process. kill -9 at random moments (in training, in checkpoint writes and renames, while pruning,
while log.txt is written) is the fault campaign's (test_fault_campaign)."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

import pytest
import torch
from helpers import (
    REPO,
    RESUMABLE_EPOCHS,
    assert_same,
    isolated_interrupts,
    load,
    pretrain_in_process,
    resumable_flags,
    run_forked,
    wait_or_kill,
)

import main_pretrain
from util.cli.errors import run_cli

ENV = {"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _final_model(out: Path) -> dict:
    return load(out / f"checkpoint-{RESUMABLE_EPOCHS - 1}.pth")["model"]


def _resume_in_process(flags: list[str]) -> None:
    """The interrupted run's command line (it has --resume auto), continued in this process."""
    with isolated_interrupts():
        pretrain_in_process(flags)


def _start(flags: list[str], log: Path, prepare: Callable[[], None] = lambda: None) -> int:
    """``main_pretrain.py flags`` in a process forked from this one, single-threaded as the reference
    run, its output in ``log``, after ``prepare()`` there; returns its pid."""

    def run() -> None:
        torch.set_num_threads(1)
        prepare()
        run_cli(lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args(flags)))

    log.touch()  # for _wait_for, before the child opens it
    with isolated_interrupts():  # no stop request or handler of an earlier test goes into the child
        return run_forked(log, run)


def _wait_for(pid: int, log: Path, marker: str, timeout: float = 300) -> None:
    """Until ``log`` has a line with ``marker``; fails the test if the process ends first (and
    leaves it unreaped, so that killing it cannot hit another process)."""
    deadline = time.time() + timeout
    while marker not in log.read_text():
        ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        assert ended is None, f"the run ended before {marker!r}:\n{log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {marker!r} in {timeout} s"
        time.sleep(0.02)


def _hang_at_the_second_checkpoints_rename() -> None:
    """The second checkpoint hangs between its write and its rename, which says so."""
    real_replace, checkpoints = os.replace, []

    def slow_replace(src, dst):
        if str(dst).endswith(".pth"):
            checkpoints.append(dst)
            if len(checkpoints) == 2:
                print("WRITTEN-NOT-RENAMED", dst, flush=True)
                time.sleep(60)
        real_replace(src, dst)

    os.replace = slow_replace


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(pretrain_reference, tmp_path, capsys):
    out = tmp_path / "out"
    flags = resumable_flags(pretrain_reference.data, out)
    pid = _start(flags, tmp_path / "killed.log", _hang_at_the_second_checkpoints_rename)
    try:
        _wait_for(pid, tmp_path / "killed.log", "WRITTEN-NOT-RENAMED")  # checkpoint-0-step4, complete, not renamed
    finally:
        os.kill(pid, signal.SIGKILL)
        killed = wait_or_kill(pid, time.time() + 60)
    assert killed == -signal.SIGKILL
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0-step2.pth"]
    assert len(list(out.glob("checkpoint-0-step4.pth.tmp*"))) == 1
    capsys.readouterr()
    _resume_in_process(flags)
    assert "resuming at epoch 0, iteration 2" in capsys.readouterr().out
    assert not list(out.glob("*.tmp*")), "stale temporary files are cleaned up"
    assert_same(_final_model(out), pretrain_reference.final()["model"])


def test_sigterm_to_the_group_checkpoints_at_the_exact_position_and_resume_is_exact(pretrain_reference, tmp_path):
    """A cluster (scancel, preemption) signals the whole process group, DataLoader workers
    included: the main process checkpoints where it is and exits 128 + 15; the workers leave it
    to. (A signal to the main process alone: test_pretrain's test_signal_in_single_process_run...)"""
    out, log = tmp_path / "out", tmp_path / "signalled.log"
    flags = resumable_flags(pretrain_reference.data, out)
    flags[flags.index("--ckpt_every_steps") + 1] = "0"  # only the signal makes a mid-epoch checkpoint
    flags[flags.index("--num_workers") + 1] = "2"
    pid = _start(flags, log, os.setsid)  # a process group of its own, which its DataLoader workers join
    try:
        _wait_for(pid, log, "Epoch: [1] [2/6]")
        os.killpg(pid, signal.SIGTERM)
        code = wait_or_kill(pid, time.time() + 300)
    finally:  # a run in its own process group outlives a failed test otherwise
        with suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        with suppress(ChildProcessError):
            os.waitpid(pid, 0)
    rest = log.read_text()
    assert code == 128 + signal.SIGTERM, rest[-2000:]
    assert "continue with --resume auto" in rest
    mid = sorted(p.name for p in out.glob("checkpoint-1-step*.pth"))
    assert len(mid) == 1, mid
    _resume_in_process(flags)
    assert_same(_final_model(out), pretrain_reference.final()["model"])


# ---------------------------------------------------------------------------------------------
def test_submitit_preempted_job_is_requeued_and_resumes_exactly(pretrain_reference, tmp_path, monkeypatch):
    """A job on submitit's local executor, with the environment the reference run had (the
    number of threads changes the order of float sums, hence the last bits), preempted in its
    second epoch: it is requeued, resumes, and ends as the reference with each epoch logged once."""
    submitit = pytest.importorskip("submitit")
    for name, value in ENV.items():  # the job's environment is this process's
        monkeypatch.setenv(name, value)
    from util.cli.launcher import Trainer

    args = main_pretrain.get_args_parser().parse_args(resumable_flags(pretrain_reference.data, tmp_path / "%j"))
    executor = submitit.AutoExecutor(folder=str(tmp_path / "%j"), cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=1, gpus_per_node=0, nodes=1)
    job = executor.submit(Trainer("main_pretrain", args))
    out = tmp_path / str(job.job_id)
    deadline = time.time() + 300
    while not (out / "checkpoint-0.pth").exists():  # preempt in the second epoch
        assert time.time() < deadline and not job.done(), job.stderr()
        time.sleep(0.2)
    # The preemption signal submitit's jobs get (SIGUSR2 by default), sent to the task as SLURM
    # would; the local executor's controller process runs the task as its child.
    task = int(Path(f"/proc/{job._process.pid}/task/{job._process.pid}/children").read_text().split()[0])
    os.kill(task, signal.SIGUSR2)
    job.result()
    log = job.stderr() + job.stdout()
    assert "Requeued job" in log, log[-3000:]
    assert "resuming at epoch" in log
    assert_same(_final_model(out), pretrain_reference.final()["model"])
    assert (out / "log.txt").read_text().count("\n") == RESUMABLE_EPOCHS


@pytest.mark.parametrize("processes", [1, 2])
def test_a_job_torchrun_restarts_continues_from_its_last_checkpoint(pretrain_reference, tmp_path, processes):
    """torchrun --max-restarts starts the job's processes again with the command it was given once one fails
    (the last rank killed here after the first epoch's checkpoint). Without --resume auto in that command they
    were refused for the checkpoints the run had saved, and no restart could help; now they continue from the
    last one and end as the reference (one process), each epoch logged once. With two, the restarted ranks
    could not connect now and then: gloo read a dead rank's address in torchrun's store (generation_store)."""
    out = tmp_path / "out"
    flags = resumable_flags(pretrain_reference.data, out)
    at = flags.index("--resume")
    del flags[at : at + 2]  # the run was not started with --resume auto
    dies_once = tmp_path / "dies_once.py"  # main_pretrain.py, killed with -9 once its first epoch is saved
    dies_once.write_text(
        textwrap.dedent(f"""
        import os, runpy, signal, sys, threading, time

        def kill_once_saved() -> None:
            while not os.path.exists({str(out / "checkpoint-0.pth")!r}):
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGKILL)

        if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "{processes - 1}":
            threading.Thread(target=kill_once_saved, daemon=True).start()
        sys.path.insert(0, {str(REPO)!r})
        runpy.run_path({str(REPO / "main_pretrain.py")!r}, run_name="__main__")
        """)
    )
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    argv = [*torchrun, "--max-restarts", "1", str(dies_once), *flags]
    job = subprocess.run(argv, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=300)
    log = job.stdout + job.stderr
    assert job.returncode == 0, log[-3000:]
    assert "failed (exitcode: " in log  # torchrun saw a process fail (the killed one, or its peer), and restarted
    assert "restart 1 of this job by its launcher: it continues from --output_dir with --resume auto" in log
    if processes == 1:  # the reference is a single process's
        assert_same(_final_model(out), pretrain_reference.final()["model"])
    assert (out / "log.txt").read_text().count("\n") == RESUMABLE_EPOCHS


def test_a_restart_of_one_torchrun_has_store_keys_of_its_own():
    """Keys of each restart apart (torchrun's store outlives the processes it restarts), but not across nodes,
    whose restart counts may differ, nor on a first start."""
    import torch.distributed as dist

    from util.train import distributed

    store = dist.HashStore()
    for restarts, nodes, prefix in (("0", "1", ""), ("2", "1", "restart_2/"), ("2", "2", "")):
        env = {"TORCHELASTIC_RESTART_COUNT": restarts, "GROUP_WORLD_SIZE": nodes}
        distributed.generation_store(store, env).set(f"rank_1_{restarts}_{nodes}", "address")
        assert store.get(f"{prefix}rank_1_{restarts}_{nodes}") == b"address"


@pytest.mark.parametrize("saved", [False, True])
@pytest.mark.parametrize("resume", ["", "checkpoint-1.pth"])
@pytest.mark.parametrize("launcher", ["TORCHELASTIC", "SLURM"])
def test_a_restarted_job_resumes_auto_only_once_it_has_saved(
    pretrain_reference, tmp_path, monkeypatch, launcher, resume, saved
):
    """Restarted by torchrun, or requeued by SLURM (preemption, a node failure; submitit's own requeue gives
    --resume auto), a job continues from its last checkpoint: SLURM's ran its command again, which went back to
    its --resume PATH, or was refused for the run's checkpoints. Before its first checkpoint a restarted job
    starts as its command says: afresh, or from --resume PATH (another run's checkpoint, an official release)."""
    from util.train import run

    out = tmp_path / "out"
    out.mkdir()
    if saved:
        (out / "checkpoint-0.pth").write_bytes((pretrain_reference.out / "checkpoint-0.pth").read_bytes())
    given = str(pretrain_reference.out / resume) if resume else ""
    flags = resumable_flags(pretrain_reference.data, out)
    flags[flags.index("--resume") + 1] = given
    monkeypatch.setenv(f"{launcher}_RESTART_COUNT", "2")
    with isolated_interrupts():
        started = run.start(main_pretrain.get_args_parser().parse_args(flags))
        run.finish()
    expected, opened = ("auto", str(out / "checkpoint-0.pth")) if saved else (given, given or None)
    assert started.args.resume == expected
    assert (started.resume_from.path if started.resume_from else None) == opened
