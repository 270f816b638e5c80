"""Runs that survive: submitit's local executor (to the end, and preempted then requeued),
and kill -9 at random moments, including in the middle of a checkpoint write. Every
interrupted run must end bitwise identical to one that was never interrupted."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import TINY, assert_same, cli, load, make_dataset  # noqa: E402

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _flags(data: Path, out: Path, epochs: int = 3) -> list[str]:
    # TINY at batch 8 (the last --batch_size wins): 48 images / 8 = 6 iterations per epoch; a check
    # point every 2 iterations.
    return [
        *[*TINY, "--batch_size", "8", "--data_path", str(data), "--output_dir", str(out), "--log_dir", ""],
        *["--epochs", str(epochs), "--warmup_epochs", "1", "--print_freq", "2", "--ckpt_every_steps", "2"],
        *["--vis_freq", "0"],
    ]


def _final_model(out: Path, epochs: int = 3) -> dict:
    return load(out / f"checkpoint-{epochs - 1}.pth")["model"]


def _pretrain_to_the_end(*argv: str) -> subprocess.CompletedProcess:
    """main_pretrain.py in a fresh process, with the reference's environment; it must succeed."""
    done = cli(["main_pretrain.py", *argv], timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run: the weights every interrupted run must end with."""
    root = tmp_path_factory.mktemp("ref")
    data = make_dataset(root / "data", 16)  # 48 images: 3 classes x 16
    out = root / "out"
    _pretrain_to_the_end(*_flags(data, out))
    return data, _final_model(out)


def _start(args: list[str], new_session: bool = False) -> subprocess.Popen:
    return subprocess.Popen(
        args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=new_session,
    )  # fmt: skip


def _wait_for(proc: subprocess.Popen, marker: str, timeout: float = 300) -> bool:
    """Read the process's output until a line contains ``marker``; False if it ended first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            return False
        if marker in line:
            return True
    raise TimeoutError(marker)


def test_kill_9_at_random_moments_never_breaks_resume(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "out"
    rng = random.Random(1234)
    cmd = [sys.executable, "main_pretrain.py", *_flags(data, out), "--resume", "auto"]
    kills = 0
    for _ in range(8):
        proc = _start(cmd)
        if kills < 3 and _wait_for(proc, "Epoch: ["):
            time.sleep(rng.uniform(0.0, 1.5))  # somewhere in training or in a checkpoint write
            proc.kill()
            proc.wait()
            kills += 1
            continue
        rest = proc.communicate(timeout=600)[0]
        if proc.returncode == 0:
            break
        pytest.fail(f"resumed run failed:\n{rest[-3000:]}")
    assert kills == 3
    assert_same(_final_model(out), expected)


SLOW_WRITE = """
import os, sys, time
sys.path.insert(0, {repo!r})
import util.checkpoint.files as ckpt
real_replace = os.replace
checkpoints = []
def slow_replace(src, dst):
    if str(dst).endswith(".pth"):
        checkpoints.append(dst)
        if len(checkpoints) == 2:  # the second checkpoint hangs between write and rename
            print("WRITTEN-NOT-RENAMED", dst, flush=True)
            time.sleep(60)
    real_replace(src, dst)
ckpt.os.replace = slow_replace
import main_pretrain
sys.argv = ["main_pretrain.py"] + sys.argv[1:]
main_pretrain.run_cli(lambda: main_pretrain.main(main_pretrain.get_args_parser().parse_args()))
"""


def test_kill_9_during_a_checkpoint_write_keeps_the_previous_one(reference, tmp_path):
    data, expected = reference
    out = tmp_path / "out"
    script = tmp_path / "slow_write.py"
    script.write_text(SLOW_WRITE.format(repo=str(REPO)))
    flags = _flags(data, out)
    proc = _start([sys.executable, str(script), *flags])
    assert _wait_for(proc, "WRITTEN-NOT-RENAMED")  # checkpoint-0-step4, complete but not renamed
    proc.stdout.close()
    proc.kill()
    proc.wait()
    assert sorted(p.name for p in out.glob("checkpoint-*.pth")) == ["checkpoint-0-step2.pth"]
    assert len(list(out.glob("checkpoint-0-step4.pth.tmp*"))) == 1
    done = _pretrain_to_the_end(*flags, "--resume", "auto")
    assert "resuming at epoch 0, iteration 2" in done.stdout + done.stderr
    assert not list(out.glob("*.tmp*")), "stale temporary files are cleaned up"
    assert_same(_final_model(out), expected)


# A cluster (scancel, preemption) signals the whole process group, DataLoader workers included.
@pytest.mark.parametrize("to_group", [False, True], ids=["to-the-process", "to-the-group-with-workers"])
def test_sigterm_checkpoints_at_the_exact_position_and_resume_is_exact(reference, tmp_path, to_group):
    data, expected = reference
    out = tmp_path / "out"
    flags = _flags(data, out)
    flags[flags.index("--ckpt_every_steps") + 1] = "0"  # only the signal makes a mid-epoch checkpoint
    flags[flags.index("--num_workers") + 1] = "2" if to_group else "0"
    proc = _start([sys.executable, "main_pretrain.py", *flags], new_session=to_group)
    try:
        assert _wait_for(proc, "Epoch: [1] [2/6]")
        if to_group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        rest = proc.communicate(timeout=300)[0]
    finally:  # a run in its own session outlives a failed test otherwise
        if proc.poll() is None and to_group:
            os.killpg(proc.pid, signal.SIGKILL)
        elif proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, rest[-2000:]
    assert "continue with --resume auto" in rest
    mid = sorted(p.name for p in out.glob("checkpoint-1-step*.pth"))
    assert len(mid) == 1, mid
    _pretrain_to_the_end(*flags, "--resume", "auto")
    assert_same(_final_model(out), expected)


# ---------------------------------------------------------------------------------------------
def _submit(data: Path, job_dir: Path, epochs: int = 3):
    """A job on submitit's local executor, with the environment the reference run had (the
    number of threads changes the order of float sums, hence the last bits)."""
    submitit = pytest.importorskip("submitit")
    os.environ.update(ENV)
    sys.path.insert(0, str(REPO))
    import main_pretrain
    from util.cli.launcher import Trainer

    args = main_pretrain.get_args_parser().parse_args(_flags(data, job_dir / "%j", epochs))
    executor = submitit.AutoExecutor(folder=str(job_dir / "%j"), cluster="local")
    executor.update_parameters(timeout_min=10, tasks_per_node=1, gpus_per_node=0, nodes=1)
    return executor.submit(Trainer("main_pretrain", args))


def test_submitit_local_job_runs_to_the_end(reference, tmp_path):
    data, expected = reference
    job = _submit(data, tmp_path)
    job.result()
    out = tmp_path / str(job.job_id)
    assert_same(_final_model(out), expected)
    assert (out / "log.txt").read_text().count("\n") == 3


def test_submitit_preempted_job_is_requeued_and_resumes_exactly(reference, tmp_path):
    data, expected = reference
    job = _submit(data, tmp_path)
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
    assert_same(_final_model(out), expected)
