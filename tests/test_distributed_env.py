"""Distributed start-up, stop signals and the SLURM launcher: one line instead of a hang or a traceback.

- an impossible launcher environment (RANK beyond WORLD_SIZE, a non-number, no MASTER_ADDR) is
  refused before anything waits, naming the variable;
- a rank started alone says what it waits for within seconds and gives up after
  MAE_DIST_START_TIMEOUT seconds;
- ranks on one GPU all stop in the same line before NCCL starts;
- a peer killed with -9 leaves the others with one line saying how to continue;
- a rank's data-loader workers end with it, however it ends;
- Ctrl-C checkpoints as SIGTERM does, a second one stops at once;
- the submitit launchers check the flags before submitting; a submitted task that fails or hands
  over destroys its process group first.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time
from argparse import Namespace
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from helpers import (  # noqa: E402
    DESTROYED_CLEANLY,
    REPO,
    TINY,
    free_port,
    load,
    make_dataset,
    make_split,
    refuse_destroy_while_ddp_lives,
    run_forked,
    run_ranks,
    started_ranks,
    wait_or_kill,
)

from util.cli.errors import STOPPED_AT_ONCE, UserError, fail, run_cli  # noqa: E402
from util.cli.launcher import Trainer, node_defaults, submit  # noqa: E402
from util.train import distributed, interrupt, launch_env, waiting  # noqa: E402

START_TIMEOUT = "MAE_DIST_START_TIMEOUT"  # documented for users: a fixed name
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_STEP_ID",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_LOCALID",
    "OMPI_COMM_WORLD_RANK",
    "OMPI_COMM_WORLD_SIZE",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    START_TIMEOUT,
)
ADDRESS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.fixture
def launcher_env(monkeypatch):
    """Set the launcher's variables of a test (and no others); returns the setter."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)

    def set_env(env: dict[str, str]) -> None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)

    return set_env


def _args(dist_url: str = "env://", dist_on_itp: bool = False) -> Namespace:
    return Namespace(dist_url=dist_url, dist_on_itp=dist_on_itp, device="cpu")


# ---------------------------------------------------------------------------------------------
# The environment, checked before anything waits
BAD_ENVIRONMENTS = {
    "rank-beyond-world": ({"RANK": "2", "WORLD_SIZE": "2", **ADDRESS}, "RANK=2 is not below WORLD_SIZE=2"),
    "negative-rank": ({"RANK": "-1", "WORLD_SIZE": "2", **ADDRESS}, "RANK='-1' must be a whole number, at least 0"),
    "rank-not-a-number": ({"RANK": "abc", "WORLD_SIZE": "2", **ADDRESS}, "RANK='abc' must be a whole number"),
    "world-of-0": ({"RANK": "0", "WORLD_SIZE": "0", **ADDRESS}, "WORLD_SIZE='0' must be a whole number, at least 1"),
    "rank-without-world": ({"RANK": "0", **ADDRESS}, "WORLD_SIZE is not set"),
    "local-rank-not-a-number": ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x", **ADDRESS}, "LOCAL_RANK='x'"),
    "no-master-addr": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "29500"}, "variable(s) MASTER_ADDR (where"),
    "no-master-port": ({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, "variable(s) MASTER_PORT (where"),
    "port-out-of-range": (
        {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"},
        "MASTER_PORT: the port 70000 must be a whole number from 1 to 65535",
    ),
    "srun-tasks-not-a-number": ({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "two"}, "SLURM_STEP_NUM_TASKS='two'"),
    "srun-rank-beyond-world": (
        {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "5", **ADDRESS},
        "SLURM_PROCID=5 is not below SLURM_STEP_NUM_TASKS=2",
    ),
    "start-timeout-not-a-number": (
        {"RANK": "0", "WORLD_SIZE": "2", START_TIMEOUT: "soon", **ADDRESS},
        "MAE_DIST_START_TIMEOUT='soon' must be a positive number of seconds",
    ),
}


@pytest.mark.parametrize("env, message", BAD_ENVIRONMENTS.values(), ids=BAD_ENVIRONMENTS.keys())
def test_an_impossible_environment_is_refused_naming_the_variable(launcher_env, env, message):
    launcher_env(env)
    started = time.monotonic()
    with pytest.raises(UserError) as refused:
        distributed.init_distributed_mode(_args())
    assert message in str(refused.value)
    assert time.monotonic() - started < 5, "refused before waiting for anybody"
    assert not distributed.is_dist()


@pytest.mark.parametrize(
    "dist_url, dist_on_itp, env, message",
    [
        ("http://host:1", False, {"RANK": "0", "WORLD_SIZE": "2"}, "--dist_url http://host:1 is not understood"),
        ("tcp://host", False, {"RANK": "0", "WORLD_SIZE": "2"}, "--dist_url tcp://host needs a host and a port"),
        ("tcp://host:x", False, {"RANK": "0", "WORLD_SIZE": "2"}, "--dist_url tcp://host:x needs a host and a port"),
        (
            "env://",
            True,
            {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"},
            "the environment variable OMPI_COMM_WORLD_LOCAL_RANK is not set",
        ),
    ],
)
def test_an_impossible_rendezvous_flag_is_refused_naming_it(launcher_env, dist_url, dist_on_itp, env, message):
    launcher_env(env)
    with pytest.raises(UserError, match="^" + message):
        distributed.init_distributed_mode(_args(dist_url, dist_on_itp))


def test_a_local_rank_without_its_gpu_says_how_many_processes_fit(launcher_env, monkeypatch):
    import torch

    launcher_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", **ADDRESS})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    args = Namespace(dist_url="env://", dist_on_itp=False, device="cuda")
    with pytest.raises(UserError, match=r"^local rank 3 has no GPU: this node has 2; start 2 process\(es\) per node$"):
        distributed.init_distributed_mode(args)


def test_the_launchers_environments_are_read_as_they_are_meant(launcher_env):
    assert launch_env.read_world({}) is None  # a plain `python main_pretrain.py`
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", **ADDRESS}
    world = launch_env.read_world(torchrun)
    assert (world.rank, world.size, world.local_rank, world.init_method) == (3, 4, 1, "env://")
    assert world.where == "127.0.0.1:29500"
    srun = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "8", "SLURM_PROCID": "7", "SLURM_LOCALID": "3"}
    world = launch_env.read_world(srun, dist_url="tcp://node1:1234")
    assert (world.rank, world.size, world.local_rank, world.listener) == (7, 8, 3, ("node1", 1234))
    assert launch_env.read_world({**srun, "SLURM_STEP_NUM_TASKS": "1"}) is None  # one task: no group
    itp = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1", **ADDRESS}
    assert launch_env.read_world(itp, dist_on_itp=True).init_method == "tcp://127.0.0.1:29500"
    assert launch_env.start_timeout({}) == launch_env.DEFAULT_START_TIMEOUT_S
    assert launch_env.start_timeout({START_TIMEOUT: "2.5"}) == 2.5


# ---------------------------------------------------------------------------------------------
# A rank started alone: it says what it waits for, then gives up
@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_started_alone_says_what_it_waits_for_and_gives_up(launcher_env, capsys, rank):
    port = free_port()
    launcher_env({"RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    launcher_env({START_TIMEOUT: "2"})
    started = time.monotonic()
    with pytest.raises(UserError) as gave_up:
        distributed.init_distributed_mode(_args())
    waited = time.monotonic() - started
    assert 1.5 < waited < 30, waited
    assert not distributed.is_dist()
    notice = capsys.readouterr().err
    assert notice == (
        f"rank {rank} of 2: waiting for the job's other processes at 127.0.0.1:{port} "
        "(giving up after 2 s; MAE_DIST_START_TIMEOUT sets it)\n"
    )
    message = str(gave_up.value)
    assert message.startswith(f"rank {rank} of 2: ") and f"127.0.0.1:{port}" in message, message
    assert message.endswith("or wait longer with MAE_DIST_START_TIMEOUT=SECONDS"), message
    assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# Ranks on one GPU: NCCL refused them ("Duplicate GPU detected") or hung, and each rank said that another had
# stopped. The check runs where NCCL would (join is given the GPU's identity), here in a gloo group.
def _join_on(gpus: list[str]):
    """A rank's main: join the job as if its GPU were ``gpus[rank]``, then say so."""

    def main() -> None:
        world = launch_env.read_world(os.environ)
        distributed.join(world, "gloo", 60, gpu=gpus[world.rank])
        print(f"rank {world.rank} joined, group of {distributed.world_size()}")
        distributed.cleanup()

    return main


SHARING = "GPU 5e1f0d2a-3c4b-4e6f-8a9b-0c1d2e3f4a5b on host gpu07"


@pytest.mark.parametrize(
    "gpus, ranks",
    [([SHARING, SHARING], "0, 1"), ([SHARING, "GPU 9a8b on host gpu07", SHARING], "0, 2")],
    ids=["both", "two-of-three"],
)
def test_ranks_on_one_gpu_all_stop_with_the_same_line_naming_it(tmp_path, gpus, ranks):
    """srun --gres=gpu:1 --ntasks-per-node=2 (each task sees the one GPU), CUDA_VISIBLE_DEVICES=0 torchrun
    --nproc_per_node=2: every rank, the one on a GPU of its own too, stops before the process group."""
    outputs = run_ranks(_join_on(gpus), tmp_path, len(gpus), timeout=120, exit_codes=[2] * len(gpus))
    line = (
        f"error: ranks {ranks} of {len(gpus)} share one GPU ({SHARING}), and NCCL needs one per process: give each "
        "process its own (srun: --ntasks-per-node equal to the GPUs per node, or --gpus-per-task=1), or start "
        "fewer (torchrun: --nproc_per_node at most the GPUs per node)\n"
    )
    assert outputs == [line] * len(gpus)


def test_ranks_on_gpus_of_their_own_go_on(tmp_path):
    """The same UUID on two hosts is two GPUs (identities name the host)."""
    gpus = ["GPU 5e1f on host gpu07", "GPU 5e1f on host gpu08", "GPU 9a8b on host gpu07"]
    outputs = run_ranks(_join_on(gpus), tmp_path, 3, timeout=120)
    assert outputs == [f"rank {r} joined, group of 3\n{DESTROYED_CLEANLY}\n" for r in range(3)]


# ---------------------------------------------------------------------------------------------
# A peer killed with -9
PEER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    from argparse import Namespace
    import torch
    from util.cli.errors import run_cli
    from util.train import distributed

    def main():
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        print("ready", flush=True)
        while True:  # DDP's gradient all-reduce, as in training
            model(torch.ones(2, 4)).sum().backward()

    run_cli(main)
    """
)


@pytest.mark.parametrize(
    "restarts, advice",
    [
        ({}, "restart the whole job with --resume auto to continue from its last checkpoint"),
        # torchrun --max-restarts 3, restarted once: it starts the job again by itself
        (
            {"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3"},
            "torchrun restarts the job while restarts are left (--max-restarts 3), from its last checkpoint",
        ),
        (
            {"TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_MAX_RESTARTS": "3"},
            "restart the whole job with --resume auto to continue from its last checkpoint",
        ),
    ],
)
def test_a_peer_killed_with_9_leaves_the_others_one_line_saying_how_to_continue(tmp_path, restarts, advice):
    script = tmp_path / "peer.py"
    script.write_text(PEER.format(repo=str(REPO)))
    with started_ranks([sys.executable, str(script)], **{START_TIMEOUT: "120"}, **restarts) as procs:
        assert [p.stdout.readline() for p in procs] == ["ready\n", "ready\n"]
        procs[1].kill()
        _, err = procs[0].communicate(timeout=120)
    assert err == f"error: another process of this job stopped, so rank 0 of 2 cannot go on; {advice}\n"
    assert procs[0].returncode == 1


# A launcher's count as it may stand in the environment (None: unset), then as read for a count of restarts
# (default 0, at least 0) and for the processes of a node (default 1, at least 1).
LAUNCHER_COUNTS = [
    (None, 0, 1),
    ("", 0, 1),
    ("two", 0, 1),
    ("1.5", 0, 1),
    ("-2", 0, 1),
    ("0", 0, 1),
    ("3", 3, 3),
    (" 3\n", 3, 3),
]


@pytest.mark.parametrize("text, restarts, processes", LAUNCHER_COUNTS)
def test_a_launcher_count_is_a_whole_number_or_the_default(text, restarts, processes):
    env = {} if text is None else {"COUNT": text}
    assert launch_env.env_count(env, "COUNT") == restarts
    assert launch_env.env_count(env, "COUNT", default=1, minimum=1) == processes


def test_a_negative_restart_count_is_read_as_a_first_start(monkeypatch):
    # Was read as it stood: -1 restarts of --max-restarts 0 said torchrun would restart the job, and a store
    # got keys of a 'restart_-1'.
    import torch.distributed as dist

    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "-1")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert distributed.peer_stopped_message() == (
        "another process of this job stopped, so rank 0 of 1 cannot go on; restart the whole job with --resume auto "
        "to continue from its last checkpoint"
    )
    store = dist.HashStore()
    assert distributed.generation_store(store, {"TORCHELASTIC_RESTART_COUNT": "-1", "GROUP_WORLD_SIZE": "1"}) is store


def test_a_rank_whose_peer_was_killed_leaves_no_loader_worker_behind(tmp_path):
    """The rank left alone exits with os._exit (a normal shutdown would be aborted by the broken group's threads),
    which skips the exit hook that kills its loader workers. They ignore SIGTERM and lived on as orphans until
    torch's watchdog saw their parent gone, up to 5 s later, or for good (found by a fault probe of 2-process
    torchrun jobs: rank 1 killed with -9, rank 0's workers outlived torchrun's exit; those of the killed rank held
    its sockets open, and rank 0 waited as long to find it gone)."""
    import torch
    from torch.utils.data import DataLoader

    workers = tmp_path / "workers"

    def rank_main() -> None:
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        loader = DataLoader(
            range(64), num_workers=2, persistent_workers=True, worker_init_fn=interrupt.ignore_in_worker
        )
        batches = iter(loader)
        next(batches)  # both workers started
        if distributed.rank() == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        workers.write_text(" ".join(str(w.pid) for w in batches._workers))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        while True:  # DDP's gradient all-reduce, as in training, finds the peer gone
            model(torch.ones(2, 4)).sum().backward()

    logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=(1, -signal.SIGKILL), timeout=120)
    assert "error: another process of this job stopped, so rank 0 of 2 cannot go on" in logs[0], logs[0]
    pids = [int(pid) for pid in workers.read_text().split()]
    assert len(pids) == 2
    assert _still_running(pids, within=2) == [], "rank 0's loader workers outlived it"


def _still_running(pids: list[int], within: float) -> list[int]:
    """Those of ``pids`` still running (neither gone nor a zombie) after ``within`` seconds; killed then."""
    deadline = time.time() + within

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    while any(map(running, pids)) and time.time() < deadline:
        time.sleep(0.05)
    left = [pid for pid in pids if running(pid)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_loader_workers_are_killed_by_the_kernel_when_their_process_ends():
    """They ignore the stop signals (interrupt.ignore_in_worker), so nothing else ends them at once when their
    process is killed with -9 or leaves with os._exit."""
    import ctypes

    from torch.utils.data import DataLoader, Dataset

    class DeathSignal(Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> int:
            value = ctypes.c_int()
            ctypes.CDLL(None).prctl(2, ctypes.byref(value))  # PR_GET_PDEATHSIG
            return value.value

    loader = DataLoader(DeathSignal(), batch_size=None, num_workers=1, worker_init_fn=interrupt.ignore_in_worker)
    assert list(loader) == [signal.SIGKILL, signal.SIGKILL]


def test_a_loader_worker_whose_process_ended_before_it_asked_to_be_killed_with_it_ends_at_once(tmp_path):
    """The kernel sends the parent-death signal only where the parent ends after the request: a worker
    started just before its rank was killed would have lived on."""
    import multiprocessing

    pid_file, went_on = tmp_path / "worker", tmp_path / "went on"

    def worker() -> None:
        parent = multiprocessing.parent_process().pid
        pid_file.with_suffix(".tmp").write_text(str(os.getpid()))
        pid_file.with_suffix(".tmp").rename(pid_file)
        while os.getppid() == parent:  # the process that started it ends first
            time.sleep(0.01)
        interrupt.end_with_parent()
        went_on.write_text("")

    def start_and_leave() -> None:
        multiprocessing.get_context("fork").Process(target=worker, daemon=True).start()
        while not pid_file.exists():
            time.sleep(0.01)
        os._exit(0)

    assert wait_or_kill(run_forked(tmp_path / "log", start_and_leave), time.time() + 60) == 0
    assert _still_running([int(pid_file.read_text())], within=30) == []
    assert not went_on.exists()


def test_a_sigterm_that_reaches_a_loader_worker_as_it_starts_is_ignored_too(tmp_path):
    """From its fork to its worker_init_fn (interrupt.ignore_in_worker) torch's own SIGTERM handler ended a worker
    that a SIGTERM to the process group reached (scancel; torchrun's to each rank's group), and its rank ended in
    "DataLoader worker (pid ...) is killed by signal: Terminated" with a traceback instead of checkpointing (found
    by a fault probe of 2-process torchrun jobs: SIGTERM to torchrun's group as a rank started its workers)."""
    from torch.utils.data import DataLoader

    from util.data.loaders import batches

    def signalled_as_it_starts(worker_id: int) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # before our worker_init_fn has made it ignore the signal
        time.sleep(0.1)
        interrupt.ignore_in_worker(worker_id)

    loader = DataLoader(range(4), num_workers=1, worker_init_fn=signalled_as_it_starts)
    assert [int(batch) for batch in batches(loader)] == [0, 1, 2, 3]


# Each loop over a loader's batches: pre-training's (every entry point's training), evaluation's, k-NN's.
CORRUPT_IMAGE_RUNS = {
    "pretrain": ("main_pretrain", "train", ["--model", "mae_vit_mini_patch4", "--vis_freq", "0"]),
    "linprobe-eval": ("main_linprobe", "val", ["--model", "vit_mini_patch4", "--nb_classes", "3", "--epochs", "1"]),
    "knn_eval": ("knn_eval", "train", ["--model", "mae_vit_mini_patch4", "--encoders", "random"]),
}


@pytest.mark.parametrize("run", CORRUPT_IMAGE_RUNS)
def test_a_rank_stopped_by_a_corrupt_image_ends_its_loader_workers_at_once(tmp_path, run):
    """A worker's error came with a traceback that held its loader's iterator in a reference cycle: the
    garbage collection (run_cli's, before it destroys the process group, or an automatic one) closed the
    iterator's queues before asking each worker to stop, then waited 5 s for it, sent it the SIGTERM it
    ignores and waited 5 s more (a rank with --num_workers 10 took 46 s to exit, its peers waiting for it
    in a collective). Each join the workers outlive is one of those waits."""
    import importlib
    import multiprocessing.process

    module, split, flags = CORRUPT_IMAGE_RUNS[run]
    data = make_split(tmp_path / "data", train=4, val=2)
    for image in (data / split).rglob("*.jpg"):  # every rank's first batch of them fails in its workers
        image.write_bytes(b"not an image")
    argv = ["--data_path", str(data), "--input_size", "32", "--batch_size", "2", "--num_workers", "2", *flags]
    argv += ["--device", "cpu"] if module == "knn_eval" else ["--output_dir", str(tmp_path / "out"), "--log_dir", ""]

    def rank_main() -> None:
        entry = importlib.import_module(module)
        join = multiprocessing.process.BaseProcess.join

        def timed_join(self, timeout=None):
            join(self, timeout)
            if self.is_alive():
                print(f"a worker outlived a join of {timeout} s", file=sys.stderr)

        multiprocessing.process.BaseProcess.join = timed_join
        entry.main(entry.get_args_parser().parse_args(argv))

    for log in run_ranks(rank_main, tmp_path / "ranks", exit_codes=(2, 2), timeout=120):
        assert "error: cannot read image" in log and "outlived" not in log, log


# ---------------------------------------------------------------------------------------------
# Ctrl-C
@pytest.fixture
def handlers():
    """util.train.interrupt's handlers installed over Python's SIGINT default (as in a terminal; a
    shell's background job starts with SIGINT ignored), and afterwards the previous ones back."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt.install()
    yield
    interrupt.uninstall()
    signal.signal(signal.SIGINT, before)


def test_the_first_ctrl_c_asks_for_a_checkpoint_and_the_second_stops_at_once(handlers, capsys):
    os.kill(os.getpid(), signal.SIGINT)
    assert interrupt.requested()
    assert interrupt.exit_code() == 130
    interrupt.hand_over()  # Ctrl-C is not a preemption: nothing to hand over, no KeyboardInterrupt
    assert capsys.readouterr().err == (
        "received SIGINT: checkpointing at the next check point (Ctrl-C again stops at once)\n"
    )
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs in the main thread between two bytecodes: here
    interrupt.uninstall()
    assert not interrupt.requested()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize(
    "stop, during_exit, heard",
    [
        (
            signal.SIGINT,
            signal.SIGINT,
            "received SIGINT: checkpointing at the next check point (Ctrl-C again stops at once)",
        ),
        (signal.SIGUSR1, signal.SIGTERM, "received SIGUSR1: checkpointing at the next check point"),
    ],
)
def test_a_signal_while_a_stopped_run_exits_leaves_its_line_and_status(
    handlers, monkeypatch, capsys, stop, during_exit, heard
):
    """Once the stop's checkpoint was written, while the run said so and destroyed its process group: a second Ctrl-C
    ended in a KeyboardInterrupt traceback, and the SIGTERM torchrun sends the other ranks once one has exited (status
    143) added "received SIGTERM: checkpointing at the next check point", a checkpoint that would never come (found
    by a fault probe of 2-process torchrun jobs)."""

    def signal_during_exit() -> None:
        os.kill(os.getpid(), during_exit)
        time.sleep(0.1)  # the handler runs in the main thread between two bytecodes: here

    def stopped() -> None:
        raise interrupt.Interrupted("out/checkpoint-0-step2.pth")

    monkeypatch.setattr(distributed, "cleanup_before_exit", signal_during_exit)
    os.kill(os.getpid(), stop)  # the stop this rank learnt of: a checkpoint at the next check point, then Interrupted
    try:
        run_cli(stopped)
    except BaseException as e:  # a KeyboardInterrupt must not reach pytest
        outcome = e
    assert isinstance(outcome, SystemExit) and outcome.code == 128 + stop, repr(outcome)
    assert capsys.readouterr().err.splitlines() == [
        heard,
        "stopped on request after writing out/checkpoint-0-step2.pth; continue with --resume auto",
    ]
    assert signal.getsignal(during_exit) is interrupt._handler  # as it was


def test_a_rank_stopped_at_once_by_ctrl_c_destroys_its_group_before_exit(tmp_path):
    """As a stop on request or an error does: left to the interpreter's shutdown, the group's threads aborted
    it once in a while after the line ("terminate called without an active exception", exit -6; 1 in 9 pairs
    of fresh interpreters whose ranks both stopped at once during DDP training)."""
    import torch

    def rank_main() -> None:
        distributed.init_distributed_mode(Namespace(dist_url="env://", dist_on_itp=False, device="cpu"))
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
        for _ in range(3):
            model(torch.ones(2, 4)).sum().backward()
        raise KeyboardInterrupt  # as a second Ctrl-C raises it

    for log in run_ranks(rank_main, tmp_path / "ranks", exit_codes=(130, 130), timeout=120):
        assert log.splitlines() == [STOPPED_AT_ONCE, DESTROYED_CLEANLY], log


def test_a_ctrl_c_that_lands_in_a_finalizer_stops_at_once_in_one_line(tmp_path):
    """Its KeyboardInterrupt cannot leave a ``__del__`` (a data loader's, waiting for its workers to stop): Python
    printed it as "Exception ignored" with a traceback, and the run went on (found by a fault probe of 2-process
    torchrun jobs)."""

    class Finalized:
        def __del__(self) -> None:
            os.kill(os.getpid(), signal.SIGINT)  # the second Ctrl-C
            time.sleep(0.1)

    def main() -> None:
        interrupt.install()
        os.kill(os.getpid(), signal.SIGINT)  # the first: a checkpoint at the next check point
        Finalized()  # freed at once
        print("went on")

    log = tmp_path / "log"
    assert wait_or_kill(run_forked(log, lambda: run_cli(main)), time.time() + 60) == 130
    assert log.read_text().splitlines() == [
        "received SIGINT: checkpointing at the next check point (Ctrl-C again stops at once)",
        STOPPED_AT_ONCE,
    ]


def test_a_ctrl_c_to_the_terminals_process_group_checkpoints_and_exits_130(tmp_path):
    """The terminal sends Ctrl-C to the whole group, data-loader workers included."""
    data = make_dataset(tmp_path / "data", 16)  # 48 images / 8 = 6 iterations per epoch
    out = tmp_path / "out"
    flags = [*TINY, "--batch_size", "8", "--num_workers", "1", "--data_path", str(data), "--output_dir", str(out)]
    flags += ["--log_dir", "", "--epochs", "2", "--warmup_epochs", "1", "--print_freq", "2", "--vis_freq", "0"]
    proc = subprocess.Popen(
        [sys.executable, "main_pretrain.py", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if "Epoch: [0] [2/6]" in line:
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert err.splitlines()[-1].startswith("stopped on request after writing ")
    assert err.splitlines()[-1].endswith("checkpoint-0-step4.pth; continue with --resume auto")
    assert load(out / "checkpoint-0-step4.pth")["step"] == 4


# ---------------------------------------------------------------------------------------------
# The submitit launchers
class FakeExecutor:
    """Stands for submitit.AutoExecutor: records what would be submitted."""

    made: list["FakeExecutor"] = []

    def __init__(self, **options):
        self.options, self.parameters, self.submitted = options, {}, []
        FakeExecutor.made.append(self)

    def update_parameters(self, **parameters):
        self.parameters.update(parameters)

    def submit(self, trainer):
        self.submitted.append(trainer)
        return SimpleNamespace(job_id="42")


@pytest.fixture
def executor():
    FakeExecutor.made = []
    return FakeExecutor


def _launch(module: str, argv: list[str], executor) -> None:
    run_cli(lambda: submit(module, "a test", argv=argv, make_executor=executor))


@pytest.mark.parametrize("module", ["main_pretrain", "main_finetune", "main_linprobe"])
@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch_size", "0"], "--batch_size must be at least 1, got 0"),
        (["--blr", "-1"], "--blr must be positive"),
        (["--nodes", "0"], "--nodes must be at least 1, got 0"),
        (["--ngpus", "0"], "--ngpus 0 runs on CPUs: give --tasks_per_node N"),  # was argparse's usage and error
        (["--mean", "0.5", "--std", "0"], "--mean takes one value per image channel (3), got 1"),  # was submitted
        # What depends on the job's 2 x 8 processes (check_world), and what its start refused: all were submitted.
        (["--seed", str(2**32 - 8)], "--seed 4294967288: rank 15 would seed with 4294967303"),
        (["--blr", "90", "--batch_size", "1024"], "the effective lr 5.76e+03 (--blr 90 x effective batch / 256)"),
        (["--ngpus", "2", "--tasks_per_node", "4"], "--tasks_per_node 4 is more than the 2 GPUs of a node"),
        (["--ngpus", "0", "--tasks_per_node", "1", "--precision", "fp16"], "--precision fp16 needs a CUDA device"),
    ],
)
def test_the_launcher_refuses_flags_the_job_would_refuse_and_submits_nothing(
    tmp_path, capsys, executor, module, argv, message
):
    with pytest.raises(SystemExit) as refused:
        _launch(module, ["--job_dir", str(tmp_path / "%j"), *argv], executor)
    assert refused.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: {message}")
    assert executor.made == [], "nothing is submitted"


def test_the_launcher_refuses_an_odd_batch_to_mix_before_submitting(tmp_path, capsys, executor):
    """Mixup and CutMix pair the images of a batch: a job with an odd one would fail once it started."""
    with pytest.raises(SystemExit):
        _launch("main_finetune", ["--job_dir", str(tmp_path / "%j"), "--batch_size", "7", "--mixup", "0.8"], executor)
    assert capsys.readouterr().err.startswith("error: --mixup/--cutmix mix pairs of images: --batch_size must be even")
    assert executor.made == [], "nothing is submitted"


def test_the_launcher_refuses_a_job_dir_inside_the_data_before_submitting(tmp_path, capsys, executor):
    """--job_dir is the job's --output_dir: its reconstruction pictures would become training images.
    Refused when the job starts already; now before it waits in the queue, naming --job_dir."""
    data = make_dataset(tmp_path / "data", 1)
    with pytest.raises(SystemExit):
        _launch("main_pretrain", ["--job_dir", str(data / "jobs" / "%j"), "--data_path", str(data)], executor)
    assert capsys.readouterr().err == (
        f"error: --job_dir {data / 'jobs' / '%j'} is inside --data_path {data}: its reconstruction pictures would "
        f"be read back as training images; give a folder outside the data\n"
    )
    assert executor.made == [], "nothing is submitted"


def test_the_launcher_refuses_a_mask_ratio_pretraining_would_refuse_before_submitting(tmp_path, capsys, executor):
    with pytest.raises(SystemExit):
        _launch("main_pretrain", ["--job_dir", str(tmp_path / "%j"), "--mask_ratio", "1"], executor)
    assert capsys.readouterr().err.startswith("error: --mask_ratio 1.0 must remove at least one patch and keep one")
    assert executor.made == [], "nothing is submitted"


@pytest.mark.parametrize(
    "argv", [["--precision", "fp16", "--tasks_per_node", "4"], ["--device", "cpu", "--tasks_per_node", "16"]]
)
def test_the_launcher_submits_fewer_tasks_than_gpus_or_cpu_tasks(tmp_path, capsys, executor, argv):
    """A task per GPU at most: fewer are fine (in fp16, which the GPUs of the job take), and a CPU job may run
    any number."""
    _launch("main_pretrain", ["--job_dir", str(tmp_path / "%j"), "--nodes", "1", *argv], executor)
    (made,) = executor.made
    assert made.parameters["tasks_per_node"] == int(argv[-1])


def test_the_launchers_default_workers_are_the_jobs_nodes_cores_not_the_submitting_machines(
    tmp_path, capsys, executor, monkeypatch
):
    """Submitted from a login node of 2 cores, each task of the job (10 CPUs) loaded its data with 2 workers."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    _launch("main_pretrain", ["--job_dir", str(tmp_path / "%j"), "--nodes", "1", "--ngpus", "1"], executor)
    _launch("main_pretrain", ["--job_dir", str(tmp_path / "%j"), "--nodes", "1", "--num_workers", "3"], executor)
    default, given = (made.submitted[0].args for made in executor.made)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(10)), raising=False)  # the job's task
    node_defaults(default)
    node_defaults(given)
    assert (default.num_workers, given.num_workers) == (10, 3)


def test_the_launchers_help_gives_the_jobs_default_device(capsys, executor):
    """It said the entry point's "cuda if present, else cpu", this machine's: a GPU job submitted from a login
    node without GPUs runs on cuda."""
    with pytest.raises(SystemExit) as done:
        submit("main_pretrain", "a test", argv=["--help"], make_executor=executor)
    assert done.value.code == 0
    assert " ".join(capsys.readouterr().out.split()).count("--device DEVICE cuda if --ngpus is above 0, else cpu") == 1


def test_the_launcher_submits_good_flags_for_the_jobs_gpus(tmp_path, capsys, executor):
    """Checked on a machine without GPUs, for a job on nodes with GPUs: the device is theirs."""
    argv = ["--job_dir", str(tmp_path / "%j"), "--nodes", "1", "--ngpus", "2", "--batch_size", "8"]
    _launch("main_pretrain", argv, executor)
    (made,) = executor.made
    (trainer,) = made.submitted
    assert trainer.args.device == "cuda"  # not this machine's default
    assert (trainer.args.batch_size, made.parameters["tasks_per_node"]) == (8, 2)
    assert capsys.readouterr().out.startswith("submitted job 42")


def test_the_launcher_puts_the_checkpoints_where_submitit_puts_the_logs_of_a_job_dir_under_home(
    tmp_path, monkeypatch, capsys, executor
):
    """`--job_dir=~/jobs/%j` reaches Python with its ~ (a shell expands none after '='): submitit expands it for
    the job's logs, and the job's --output_dir was the literal path, ./~/jobs/<id> under the job's folder."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    _launch("main_pretrain", ["--job_dir=~/jobs/%j", "--nodes", "1", "--ngpus", "1"], executor)
    (made,) = executor.made
    (trainer,) = made.submitted
    jobs = str(tmp_path / "home" / "jobs" / "%j")
    assert (made.options["folder"], trainer.args.output_dir) == (jobs, jobs)
    assert capsys.readouterr().out.startswith(f"submitted job 42; logs and checkpoints in {jobs.replace('%j', '42')}")


def test_the_launcher_submits_a_batch_script_whose_srun_asks_for_each_tasks_cpus(tmp_path, monkeypatch, capsys):
    """The batch script submitit writes for a job of 2 nodes x 2 GPUs, a fake sbatch and srun standing for
    SLURM's. Its srun asks for each task's CPUs itself: from Slurm 22.05 srun no longer takes sbatch's
    --cpus-per-task (23.11 takes it again), so each task asked for one CPU, which a cluster that binds
    tasks to their CPUs made the only one of the process and its data loader's workers."""
    pytest.importorskip("submitit")
    (tmp_path / "bin").mkdir()
    for name, body in (("srun", "exit 0"), ("sbatch", 'echo "Submitted batch job 4242"')):
        (tmp_path / "bin" / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / "bin" / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    jobs = tmp_path / "jobs" / "%j"
    argv = ["--job_dir", str(jobs), "--nodes", "2", "--ngpus", "2", "--batch_size", "8"]
    run_cli(lambda: submit("main_pretrain", "a test", argv=argv))  # submitit's own executor: SLURM's, as srun is here
    folder = tmp_path / "jobs" / "4242"
    assert capsys.readouterr().out.startswith(f"submitted job 4242; logs and checkpoints in {folder}")
    script = (folder / "4242_submission.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=10", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in script, script
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    assert f" --output {jobs}/%j_%t_log.out " in srun and " --cpus-per-task=10 " in srun, srun


@pytest.mark.parametrize("ending", ["refused", "stopped", "stopped, destroy fails"])
def test_a_submitit_task_destroys_its_process_group_before_it_fails_or_hands_over(tmp_path, ending):
    """The submitted task, in a 1-rank gloo group whose DDP has all-reduced once, ends in a
    ``UserError`` or a stop on request. Either way the group goes before the task's exception or
    exit, with no DDP alive (freed later, gloo's destructor can hang: distributed.cleanup); a stop
    exits 128 + SIGTERM even when destroying the group fails."""
    import torch
    import torch.distributed as dist

    def main(args: Namespace) -> None:
        distributed.init_distributed_mode(args)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))
        model(torch.ones(1, 2)).sum().backward()
        if ending == "refused":
            fail("--blr must be positive")
        raise interrupt.Interrupted(None, str(tmp_path))

    def task() -> None:
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        refuse_destroy_while_ddp_lives()
        if ending == "stopped, destroy fails":
            dist.destroy_process_group = lambda: fail("destroy failed")
        sys.modules["entry_for_test"] = SimpleNamespace(main=main)
        trainer = Trainer("entry_for_test", Namespace(resume="", dist_url="env://", dist_on_itp=False, device="cpu"))
        trainer._set_up_task = lambda args: None  # no submitit job around this process
        try:
            trainer()
        except UserError as raised:
            print(f"raised: {raised}; group alive: {dist.is_initialized()}")

    log = tmp_path / "task.log"
    code = wait_or_kill(run_forked(log, task), time.time() + 120)
    output = log.read_text()
    if ending == "refused":
        assert code == 0, output
        assert "raised: --blr must be positive; group alive: False" in output
    else:
        assert code == 128 + signal.SIGTERM, output
    assert (DESTROYED_CLEANLY in output) == (ending != "stopped, destroy fails"), output


SUBMITIT_SLURM_TASK = {  # what SLURM gives task 1 of a job of 2 nodes x 1 task, and submitit reads
    "SUBMITIT_EXECUTOR": "slurm",
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NUM_NODES": "2",
    "SLURM_JOB_NODELIST": "gpu[07-08]",
    "SLURM_NTASKS": "2",
    "SLURM_NODEID": "1",
    "SLURM_PROCID": "1",
    "SLURM_LOCALID": "0",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
}


@pytest.mark.parametrize("given, used", [(None, None), ("", ""), ("tb/%j", "tb/4242"), ("/tb/run1", "/tb/run1")])
def test_a_submitit_task_writes_tensorboard_where_log_dir_says(monkeypatch, given, used):
    """--log_dir was replaced by --output_dir in every task: a --log_dir given was not used, and '' (no
    TensorBoard) wrote events all the same. None is --output_dir's, which the run itself takes (run.start)."""
    pytest.importorskip("submitit")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # restored afterwards, whatever the task exports
        monkeypatch.delenv(name)
    for name, value in SUBMITIT_SLURM_TASK.items():
        monkeypatch.setenv(name, value)
    args = Namespace(output_dir="jobs/%j", log_dir=given, dist_url="", dist_on_itp=False, device="cpu", num_workers=1)
    Trainer._set_up_task(args)
    assert (args.output_dir, args.log_dir) == ("jobs/4242", used)


@pytest.mark.parametrize("inherited", [{}, {"MASTER_ADDR": "login1", "RANK": "0", "WORLD_SIZE": "1"}])
def test_a_submitit_task_on_the_second_node_meets_the_first_node_as_its_rank(monkeypatch, inherited):
    """--nodes 2: the rank, world size and rendezvous each task takes from SLURM's variables through
    submitit, also over variables the job inherited from the shell that submitted it (sbatch passes its
    environment on): those raised "Cannot export environment variables as MASTER_ADDR is already set"
    in every task."""
    pytest.importorskip("submitit")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # restored afterwards, whatever the task exports
        monkeypatch.delenv(name)
    for name, value in {**SUBMITIT_SLURM_TASK, **inherited}.items():
        monkeypatch.setenv(name, value)
    args = Namespace(output_dir="jobs/%j", log_dir=None, dist_url="", dist_on_itp=False, device="cpu", resume="auto")
    args.num_workers = None  # the launcher's default: the task's node's (node_defaults)
    Trainer._set_up_task(args)
    world = launch_env.read_world(os.environ, args.dist_url)
    assert (world.rank, world.size, world.local_rank, world.init_method) == (1, 2, 0, "env://")
    assert world.listener[0] == "gpu07"  # the job's first node
    assert 20000 <= world.listener[1] <= 60000  # submitit's port of the job id: the same in every task
    assert args.output_dir == "jobs/4242"
    assert args.num_workers >= 1


# ---------------------------------------------------------------------------------------------
# Waiting for other ranks' work (a URL checkpoint's download) as long as it gets on
def test_waiting_for_several_stuck_workers_says_one_of_them_stopped(monkeypatch):
    """Was "waited for ranks 0, 2 to ..., which got no further ...: it stopped or is stuck"."""
    import torch.distributed as dist

    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    keys = dist.HashStore()
    keys.add("done", 1)  # one of the two finished, the other got no further
    with pytest.raises(UserError) as refused:
        waiting._wait_for_workers(keys, [0, 2], 0.2, "download URL for --finetune", str)
    assert str(refused.value) == (
        "rank 1 of 4 waited for ranks 0, 2 to download URL for --finetune, which got no further for 0.2 s (0 so far): "
        "one of them stopped or is stuck; see their output, and run again"
    )
