"""Fixtures shared across test files, and the suite's view of the GPUs."""

import os

# The suite hides a machine's GPUs unless asked (set before any import, as CUDA reads it once: at its start). Its
# tests are CPU tests: the entry points default to CUDA where present, and the figures they pin (bitwise
# resume, the demo's losses) are CPU figures. And they fork processes (helpers.run_ranks, the warm
# interpreter) from this one, which would have started CUDA at its first optimizer step (torch's step asks
# the current CUDA stream whether it is capturing a graph): CUDA cannot start again in a forked child.
# tests/test_cuda.py runs on its own with the opt-in, as benchmarks/gpu_check.sh runs it.
CUDA_OPT_IN = "MAE_TEST_CUDA"
if os.environ.get(CUDA_OPT_IN) != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
# The suite's runs are first starts wherever it runs: in a job a launcher restarted (a requeued SLURM job, say)
# they would take that for their own restart and continue the checkpoints a test gives them (run.start).
for restarts in ("TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_MAX_RESTARTS", "SLURM_RESTART_COUNT"):
    os.environ.pop(restarts, None)
# Run by pytest-xdist's workers (`-n auto`), the suite shares the cores among them: torch in each worker and in the
# processes it starts takes every core by default, and 2 workers of 2 threads on 2 cores ran it 10% slower than of 1.
# Read by torch at its import, below; a value given outside wins.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)) // WORKERS)))
# The memory: with 2 workers the machine's used memory peaked at 4.7 GB (1 GB before the suite), and pytest's
# temporary folder at 1.2 GB; more than 2 workers has not been measured.
MAX_WORKERS = 4

import tempfile  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from helpers import Reference  # noqa: E402
from warm_python import warm_python  # noqa: E402


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's, which a plain `pytest` may run without
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """What `-n auto` starts: a worker per core, at most MAX_WORKERS (the suite's memory)."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="session", autouse=True)
def temporary_files_in_pytests_folder(tmp_path_factory) -> Iterator[None]:
    """The temporary files of the processes the suite starts go into a folder of pytest's, which it prunes (it
    keeps the last three sessions'), not into the machine's: the runs a test kills, or that leave with os._exit,
    left multiprocessing's pymp-* and torchrun's torchelastic_* folders behind (5 from test_distributed_env and
    test_resilience)."""
    folder = tmp_path_factory.mktemp("tmp")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # read again from TMPDIR
    yield
    if before is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = before
    tempfile.tempdir = None


@pytest.fixture(scope="session")
def pretrain_reference(tmp_path_factory) -> Reference:
    """The uninterrupted run of ``helpers.resumable_flags``, made once a session: test_resilience,
    the fault campaign and test_pretrain compare interrupted runs with its final checkpoint."""
    return Reference.make(tmp_path_factory.mktemp("pretrain-reference"))


@pytest.fixture(scope="session")
def warm_interpreter(tmp_path_factory) -> Iterator[Path]:
    """A ``python`` whose runs are forked from one process that imported torch and the entry points
    (tests/warm_python.py): the command-line tests and the recipes pay for those imports once a
    session, not once a test."""
    with warm_python(tmp_path_factory.mktemp("warm-python")) as python:
        yield python


REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def leaves_the_checkout_clean() -> Iterator[None]:
    """A test writes under its own temporary folders: a run given --output_dir but not --log_dir
    would put TensorBoard files in the checkout's ./output_dir (the official default), and one given
    neither would make that folder, empty or not."""
    default = REPO / "output_dir"  # --output_dir's and --log_dir's default
    before = default.exists(), sorted(default.rglob("*"))
    yield
    # Under -n auto a test in another worker, running meanwhile, may be the one that wrote there.
    suspects = "this test or one running beside it in another worker" if WORKERS > 1 else "the test"
    after = default.exists(), sorted(default.rglob("*"))
    assert after == before, f"{suspects} made or wrote into {default}: give its runs --output_dir and --log_dir"


@pytest.fixture(autouse=True)
def releases_output_dirs() -> Iterator[None]:
    """A test that calls run.start outside an entry point's main keeps its --output_dir claimed
    (util.claim.claim_output_dir), as its process would until it ends: each test starts as a fresh
    process does, holding none."""
    from util.claim import release_output_dirs

    yield
    release_output_dirs()
