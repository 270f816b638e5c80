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


def test_each_worker_takes_rendezvous_ports_of_its_own_outside_the_kernels_range(monkeypatch):
    """Two workers never get the same port, the kernel never hands one to a socket of its own choosing (its ephemeral
    range starts at 32768 by default), and a port something listens on is passed over."""
    import socket

    import helpers

    blocks = {}
    for worker in ("gw0", "gw1", "gw3"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        monkeypatch.setattr(helpers, "_next_ports", None)
        blocks[worker] = {helpers.free_port() for _ in range(50)}
        assert len(blocks[worker]) == 50  # in turn, not the same port twice
        assert all(20000 <= port < 32768 for port in blocks[worker])
    assert not blocks["gw0"] & blocks["gw1"] and not blocks["gw1"] & blocks["gw3"]

    with socket.socket() as held:
        held.bind(("127.0.0.1", helpers.free_port()))
        held.listen()
        taken = held.getsockname()[1]
        block = helpers._port_block()
        monkeypatch.setattr(helpers, "_next_ports", iter([taken, taken + 1]))
        assert taken in block and helpers.free_port() == taken + 1
