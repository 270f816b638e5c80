"""The suite's own set-up under pytest-xdist (`-n auto`, as .ci/run and the README run it)."""

import os

import conftest
import torch


def test_auto_starts_a_worker_per_core_up_to_the_cap():
    cores = len(os.sched_getaffinity(0))
    assert conftest.pytest_xdist_auto_num_workers(None) == min(cores, conftest.MAX_WORKERS)


def test_a_worker_runs_torch_on_its_share_of_the_cores():
    """conftest sets OMP_NUM_THREADS before torch is imported, which reads it only then: imported
    earlier (a plugin, a conftest import moved up), each worker would run torch on every core."""
    if conftest.WORKERS > 1:
        assert "OMP_NUM_THREADS" in os.environ
    if "OMP_NUM_THREADS" in os.environ:
        assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])
