"""What CUDA and NCCL ask of the code, checked on a CPU with torch.cuda and the process group faked
(tests/test_cuda.py runs the real thing where there is a GPU): each process on its own GPU before its
NCCL group starts, and its first barrier on that GPU; a single process on the GPU it names; the tensors
of collectives on the run's device."""

import socket
from argparse import Namespace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import knn_eval
import main_finetune
import main_linprobe
import main_pretrain
from util.cli.errors import UserError
from util.cli.log import set_rank
from util.eval import knn
from util.train import distributed, gpus

LAUNCHERS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_STEP_ID", "OMPI_COMM_WORLD_RANK", "CUDA_VISIBLE_DEVICES")
ADDRESS = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


class Stop(Exception):
    """Raised by a faked collective once it has seen its tensors."""


class FakeStore:
    """Takes no operation: one would be a round trip to rank 0's store."""

    def set_timeout(self, timeout) -> None:
        pass


class Calls(list):
    """What the faked torch was asked, in order, as (name, argument); ``gpus``: how many it has."""

    gpus = 2


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with GPUs (2 unless the test sets ``fake_gpus.gpus``; GPU i's UUID is "uuid-i") and a process
    group that starts without starting, its ranks on GPUs of their own: returns the recorded ``Calls``."""
    calls = Calls()
    for name in LAUNCHERS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: calls.gpus)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(uuid=f"uuid-{d.index}"))
    monkeypatch.setattr(gpus, "refuse_shared_gpu", lambda s, w, gpu: calls.append(("refuse_shared_gpu", gpu)))
    monkeypatch.setattr(distributed, "_wait_for_listener", lambda *a: None)

    def rendezvous(*args, **kwargs):
        calls.append(("rendezvous", None))
        return iter([(FakeStore(), 0, 0)])

    monkeypatch.setattr(dist, "rendezvous", rendezvous)
    monkeypatch.setattr(dist, "init_process_group", lambda name, **k: calls.append(("init_process_group", (name, k))))
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: calls.append(("barrier", k.get("device_ids"))))
    yield calls
    set_rank(0, distributed=False)  # as a single process: the log shows everything again


def _gpu_args(device: str = "cuda") -> Namespace:
    return Namespace(dist_url="env://", dist_on_itp=False, device=device)


def test_each_rank_takes_its_gpu_before_its_nccl_group_starts_and_meets_the_others_on_it(fake_gpus, monkeypatch):
    """Without device_ids, NCCL's barrier guesses the GPU (rank % GPUs in torch 2.6; the current one, with a
    warning, in 2.14). And the group is not bound to it (init_process_group's device_id): that starts NCCL
    eagerly, in torch 2.6 and 2.7.0 in NCCL's non-blocking mode, whose NCCL 2.26 hangs at random."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **ADDRESS}.items():
        monkeypatch.setenv(name, value)
    args = _gpu_args()
    distributed.init_distributed_mode(args)
    names = ["set_device", "rendezvous", "refuse_shared_gpu", "init_process_group", "barrier"]
    assert [name for name, _ in fake_gpus] == names
    assert fake_gpus[0] == ("set_device", torch.device("cuda", 1))
    assert fake_gpus[2] == ("refuse_shared_gpu", f"GPU uuid-1 on host {socket.gethostname()}")
    backend, options = fake_gpus[3][1]
    assert backend == "nccl" and options.get("device_id") is None
    assert fake_gpus[4] == ("barrier", [1])
    assert args.device == "cuda:1" and args.gpu == 1


def test_a_gloo_group_meets_on_no_device_and_checks_no_gpu(fake_gpus, monkeypatch):
    """No store operation beyond the rendezvous (FakeStore takes none): a CPU job pays nothing for the check
    that ranks are on GPUs of their own."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "1", **ADDRESS}.items():
        monkeypatch.setenv(name, value)
    distributed.init_distributed_mode(_gpu_args("cpu"))
    assert [name for name, _ in fake_gpus] == ["rendezvous", "init_process_group", "barrier"]
    backend, options = fake_gpus[1][1]
    assert backend == "gloo" and options.get("device_id") is None
    assert fake_gpus[2] == ("barrier", None)


SRUN = {"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_LOCALID": "3", **ADDRESS}


MPIRUN = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3", **ADDRESS}


@pytest.mark.parametrize("launch", [SRUN, MPIRUN], ids=["srun", "mpirun"])
def test_a_process_given_one_gpu_of_its_own_trains_on_it_whatever_its_local_rank(fake_gpus, monkeypatch, launch):
    """srun --gpus-per-task=1: each task sees one GPU (CUDA_VISIBLE_DEVICES names it), SLURM_LOCALID counts on;
    an mpirun wrapper may do the same."""
    fake_gpus.gpus = 1
    for name, value in {**launch, "CUDA_VISIBLE_DEVICES": "GPU-5e1f0d2a-3c4b-4e6f-8a9b-0c1d2e3f4a5b"}.items():
        monkeypatch.setenv(name, value)
    args = _gpu_args()
    args.dist_on_itp = launch is MPIRUN
    distributed.init_distributed_mode(args)
    assert fake_gpus[0] == ("set_device", torch.device("cuda", 0))
    assert args.device == "cuda:0" and args.gpu == 0
    assert fake_gpus[4] == ("barrier", [0])


@pytest.mark.parametrize("visible", [None, "0,1,2"], ids=["all-visible", "three-visible"])
def test_more_processes_than_gpus_are_still_refused(fake_gpus, monkeypatch, visible):
    for name, value in SRUN.items():
        monkeypatch.setenv(name, value)
    if visible:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    with pytest.raises(UserError, match=r"^local rank 3 has no GPU: this node has 2; start 2 process\(es\) per node$"):
        distributed.init_distributed_mode(_gpu_args())
    assert fake_gpus == []


@pytest.mark.parametrize("launcher", ["torchrun", "submitit", "srun"])
def test_processes_sharing_their_nodes_one_gpu_take_it_and_meet_the_check_under_its_name(
    fake_gpus, monkeypatch, launcher
):
    """`CUDA_VISIBLE_DEVICES=0 torchrun --nproc_per_node=2`, submitit's --tasks_per_node 2 --ngpus 1 (it
    exports torchrun's variables), srun --gres=gpu:1 --ntasks-per-node=2: every rank sees the one GPU, takes it
    and names it alike, so refuse_shared_gpu (tests/test_distributed_env.py) stops them in one line. NCCL's
    refusal ended each in "another process of this job stopped"; gpu_of's refusal of rank 1 before the rendezvous
    left rank 0 waiting for it."""
    fake_gpus.gpus = 1
    for rank in ("0", "1"):
        env = {"RANK": rank, "WORLD_SIZE": "2", "LOCAL_RANK": rank, "CUDA_VISIBLE_DEVICES": "0", **ADDRESS}
        if launcher != "torchrun":  # an srun task
            env.update({"SLURM_STEP_ID": "0", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": rank, "SLURM_LOCALID": rank})
        if launcher == "srun":
            del env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = _gpu_args()
        distributed.init_distributed_mode(args)
        assert args.device == "cuda:0"
    checked = [gpu for name, gpu in fake_gpus if name == "refuse_shared_gpu"]
    assert checked == [f"GPU uuid-0 on host {socket.gethostname()}"] * 2


@pytest.mark.parametrize("device, current", [("cuda:1", torch.device("cuda", 1)), ("cuda", None), ("cpu", None)])
def test_a_single_process_on_cuda_n_makes_it_the_current_device(fake_gpus, device, current):
    """Else checkpoints saved GPU 0's random state (util/checkpoint/rng.py reads the current device's) while
    the masks were drawn on GPU 1, whose stream a resumed run then restarted from the seed; and the loader's
    pinned memory and is_bf16_supported used GPU 0, where nothing trains."""
    args = _gpu_args(device)
    distributed.init_distributed_mode(args)
    assert fake_gpus == ([("set_device", current)] if current else [])
    assert args.device == device and not args.distributed


@pytest.mark.parametrize("entry", [main_pretrain, main_finetune, main_linprobe, knn_eval], ids=lambda m: m.__name__)
def test_a_gpu_beyond_the_machines_is_refused_in_one_line_before_any_is_used(fake_gpus, tmp_path, entry):
    """--device cuda:2 with two GPUs: each entry point's checks refuse it before use_named_gpu's set_device,
    whose CUDA error ('invalid device ordinal') would be a traceback."""
    argv = ["--data_path", str(tmp_path), "--device", "cuda:2", "--output_dir", str(tmp_path / "out")]
    if entry is knn_eval:
        argv = ["--data_path", str(tmp_path), "--device", "cuda:2", "--encoders", "random"]
    with pytest.raises(UserError, match=r"^--device cuda:2: there are only 2 GPU\(s\), cuda:0 and up$"):
        entry.main(entry.get_args_parser().parse_args(argv))
    assert fake_gpus == []


# ---------------------------------------------------------------------------------------------
# Collectives: NCCL takes tensors on the rank's GPU only ("meta" stands for it here)
def test_summed_numbers_travel_on_the_runs_device(monkeypatch):
    seen = []

    def all_reduce(tensor, *a, **k):
        seen.append(tensor.device)
        raise Stop

    monkeypatch.setattr(distributed, "is_dist", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    for call in (lambda: distributed.all_reduce_sum([1.0, 2.0], "meta"), lambda: distributed.any_rank(True, "meta")):
        with pytest.raises(Stop):
            call()
    assert seen == [torch.device("meta")] * 2


def test_knn_features_are_gathered_on_their_device(monkeypatch):
    seen = []
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather", lambda outputs, tensor: seen.extend(t.device for t in [*outputs, tensor]))
    gathered = knn._gather_in_order(torch.empty(3, 8, device="meta"), 5)
    assert gathered.shape == (5, 8) and gathered.device.type == "meta"
    assert seen == [torch.device("meta")] * 3
