"""Shared helpers for the pre-training, checkpoint and data tests: tiny data sets, runs of
``main_pretrain`` in-process and on the command line, the uninterrupted reference run that
interrupted runs are compared with, exact comparison of saved states, one-line errors, the official
state-dict spec and layouts, a clean util.train.interrupt, ranks forked into a gloo group, and files that run
out of room."""

import argparse
import builtins
import functools
import http.server
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "cifar10-2k"
SPEC_PATH = REPO.parent / "shared" / "spec" / "official_state_dict_specs.json"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

CLASSES = ("airplane", "cat", "ship")

# The smallest model at CIFAR size; everything else as fast as possible on a CPU.
TINY = [
    "--model",
    "mae_vit_tiny_patch4",
    "--input_size",
    "32",
    "--batch_size",
    "16",
    "--num_workers",
    "0",
    "--device",
    "cpu",
    "--precision",
    "fp32",
]


def load_spec() -> dict[str, dict[str, list[int]]]:
    """The official checkpoints' parameter names and shapes; skips the test where ../shared/spec is missing."""
    if not SPEC_PATH.is_file():
        import pytest

        pytest.skip(f"official state-dict spec not found at {SPEC_PATH}")
    return json.loads(SPEC_PATH.read_text())


def official_layouts(size: int, in_chans: int = 3) -> dict[str, dict[str, torch.Tensor]]:
    """mae_vit_tiny_patch4's weights at ``size`` px (of ``in_chans`` image channels) as the official
    releases hold them (their names: test_official_names): full (mae_visualize_*), encoder only
    (mae_pretrain_*), a classifier fine-tuned with --cls_token (the final norm and a head:
    mae_finetuned_*'s names) and one with global pooling (``fc_norm`` instead of the final norm, as the
    official fine-tuned releases), each head of 3 classes."""
    import models_mae
    import models_vit

    full = models_mae.mae_vit_tiny_patch4(img_size=size, in_chans=in_chans).state_dict()
    encoder = {k: v for k, v in full.items() if not k.startswith(("decoder_", "mask_token"))}
    head = {"head.weight": torch.zeros(3, 192), "head.bias": torch.zeros(3)}
    pooled = models_vit.vit_tiny_patch4(img_size=size, in_chans=in_chans, num_classes=3, global_pool=True)
    pooled = pooled.state_dict()
    return {"full": full, "encoder": encoder, "classifier": {**encoder, **head}, "pooled": pooled}


def shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    return {name: list(t.shape) for name, t in module.state_dict().items()}


def demo_files(n: int, classes: Sequence[str] = CLASSES) -> list[Path]:
    """The first ``n`` images of each class of the committed CIFAR-10 sample."""
    files = []
    for c in classes:
        files += sorted((DEMO / c).glob("*.jpg"))[:n]
    assert len(files) == n * len(classes), f"demo data under {DEMO} is incomplete"
    return files


def cifar_layout(root: Path, train: int, test: int, classes: Sequence[str] = CLASSES) -> Path:
    """CIFAR-10's layout (``train/`` and ``test/`` class folders, as ../shared has it) with ``train`` +
    ``test`` demo images of each of ``classes``."""
    for i, src in enumerate(demo_files(train + test, classes)):
        split = "train" if i % (train + test) < train else "test"
        dest = root / split / src.parent.name / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return root


def make_split(root: Path, train: int, val: int) -> Path:
    """<root>/train/<class>/ and <root>/val/<class>/ from disjoint demo images: ``train`` and
    ``val`` per class."""
    for cls in CLASSES:
        files = sorted((DEMO / cls).glob("*.jpg"))
        for split, chosen in (("train", files[:train]), ("val", files[train : train + val])):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for f in chosen:
                shutil.copyfile(f, root / split / cls / f.name)
    return root


def make_dataset(root: Path, per_class: int, classes: Sequence[str] = CLASSES, layout: str = "classes") -> Path:
    """Copy demo images into ``root``: 'classes' (<root>/<class>/*), 'train' (<root>/train/<class>/*),
    'flat' (<root>/*) or 'nested' (<root>/<a>/<b>/*). Returns ``root``."""
    root.mkdir(parents=True, exist_ok=True)
    for i, src in enumerate(demo_files(per_class, classes)):
        cls = src.parent.name
        if layout == "classes":
            dest = root / cls / src.name
        elif layout == "train":
            dest = root / "train" / cls / src.name
        elif layout == "flat":
            dest = root / f"{cls}_{src.name}"
        elif layout == "nested":
            dest = root / f"part{i % 2}" / cls / src.name
        else:
            raise ValueError(layout)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
    return root


def noisy_photo(path: Path, width: int, height: int, mode: str = "RGB", fmt: str = "JPEG") -> Path:
    """A synthetic photo: gradients plus noise, so JPEG keeps some detail and a flipped crop
    differs from an unflipped one."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(width * height)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 128 + 0 * x], axis=-1)
    pixels = (base + rng.normal(0, 20, base.shape)).clip(0, 255).astype(np.uint8)
    Image.fromarray(pixels).convert(mode).save(path, format=fmt, quality=90)
    return path


def assert_crop_boxes_follow_torchvision(ours: Any, width: int, height: int) -> None:
    """``ours``, (top, left, height, width) rows drawn for a ``width`` x ``height`` image with the
    recipe's scale (0.2, 1) and ratio (3/4, 4/3), against as many boxes of torchvision's
    RandomResizedCrop.get_params: area, aspect ratio and position by a two-sample KS test."""
    import numpy as np
    from PIL import Image
    from torchvision import transforms

    torch.manual_seed(0)
    image = Image.new("RGB", (width, height))
    theirs = [transforms.RandomResizedCrop.get_params(image, [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(len(ours))]

    def features(boxes: Any) -> dict[str, Any]:
        top, left, h, w = np.asarray(boxes, dtype=float)[:, :4].T
        return {
            "area": h * w / (width * height),
            "log ratio": np.log(w / h),
            "top": (top + 0.5) / (height - h + 1),  # position within the room left
            "left": (left + 0.5) / (width - w + 1),
        }

    def ks_distance(a: Any, b: Any) -> float:
        """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
        grid = np.sort(np.concatenate([a, b]))
        cdf_a = np.searchsorted(np.sort(a), grid, side="right") / len(a)
        cdf_b = np.searchsorted(np.sort(b), grid, side="right") / len(b)
        return float(np.abs(cdf_a - cdf_b).max())

    expected = features(theirs)
    for name, values in features(ours).items():
        # 5% critical value for two samples of 4000: 0.030; 0.001: 0.044.
        assert ks_distance(values, expected[name]) < 0.045, name


def pretrain_args(data: Path, out: Path, *extra: str):
    import main_pretrain

    argv = [*TINY, "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(out), *extra]
    return main_pretrain.get_args_parser().parse_args(argv)


def run_pretrain(data: Path, out: Path, *extra: str, init_seed: int | None = 0, threads: int = 1):
    """Run ``main_pretrain.main`` in this process. ``init_seed`` seeds the global generator first;
    the run seeds it again with ``--seed`` before it builds the model (test_seed_determines_initial_weights),
    so it only keeps what a test draws before the run from depending on earlier tests."""
    args = pretrain_args(data, out, *extra)
    if init_seed is not None:
        torch.manual_seed(init_seed)
    pretrain_in_process(args, threads)
    return args


def pretrain_in_process(args: "argparse.Namespace | Sequence[str]", threads: int = 1) -> None:
    """``main_pretrain.main`` on parsed ``args`` (or a command line) in this process. One thread:
    faster on a small, busy machine, and the float sums of a fresh ``OMP_NUM_THREADS=1`` run, so
    that a run resumed in-process ends bitwise as one run on the command line does."""
    import main_pretrain

    if not isinstance(args, argparse.Namespace):
        args = main_pretrain.get_args_parser().parse_args(list(args))
    with torch_threads(threads):
        main_pretrain.main(args)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for a while."""
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def cli(
    argv: Sequence[str], timeout: float = 300, python: Path | str = sys.executable, **kwargs: Any
) -> subprocess.CompletedProcess:
    """``python <argv>`` from the repository root, output captured."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **kwargs.pop("env", {})}
    return subprocess.run(
        [str(python), *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )


# The resumable reference run that test_resilience, the fault campaign and test_pretrain compare
# interrupted runs with: the mini model (a fifth of the tiny one's step FLOPs; the model's size does not
# matter to an exact resume) at batch 8 (the last --model and --batch_size win over TINY's) on 48
# images, 6 iterations an epoch, a checkpoint every 2 iterations, and --resume auto.
RESUMABLE_EPOCHS = 3
RESUMABLE_ITERS = 6
RESUMABLE_BLR = 4e-3  # lr 1.25e-4 at batch 8: the loss falls by a third in the 3 epochs
# The schedule and check points, which the fault campaign's fine-tuning and probing runs share.
RESUMABLE_SCHEDULE = ["--epochs", str(RESUMABLE_EPOCHS), "--warmup_epochs", "1", "--print_freq", "2"]
RESUMABLE_SCHEDULE += ["--ckpt_every_steps", "2", "--resume", "auto"]
RESUMABLE = [*TINY, "--model", "mae_vit_mini_patch4", "--batch_size", "8", "--blr", str(RESUMABLE_BLR)]
RESUMABLE += [*RESUMABLE_SCHEDULE, "--vis_freq", "0"]


def resumable_flags(data: Path, out: Path) -> list[str]:
    return [*RESUMABLE, "--data_path", str(data), "--output_dir", str(out), "--log_dir", ""]


# What the reference run writes beyond an interrupted run's files, for test_pretrain; none of it
# changes training: every checkpoint kept, TensorBoard's events, pictures after epochs 0 and 2.
REFERENCE_EXTRAS = ["--keep_last", "0", "--vis_freq", "2"]


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run of ``resumable_flags`` (and REFERENCE_EXTRAS, TensorBoard in ``out``) in
    a fresh, single-threaded interpreter, as the command line runs it: ``data`` (48 images), ``out``
    (its output folder) and ``seconds`` (its training time, imports left out)."""

    data: Path
    out: Path
    seconds: float

    def final(self) -> dict[str, Any]:
        """The last checkpoint, which every interrupted and resumed run must end with bitwise."""
        return load(self.out / f"checkpoint-{RESUMABLE_EPOCHS - 1}.pth")

    @classmethod
    def make(cls, root: Path) -> "Reference":
        data, out = make_dataset(root / "data", 16), root / "reference"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        flags = [*resumable_flags(data, out), *REFERENCE_EXTRAS, "--log_dir", str(out)]
        argv = [sys.executable, "main_pretrain.py", *flags]
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = [proc.stdout.readline()]  # the first line comes once the imports are done
        begin = time.time()
        lines += proc.stdout.readlines()
        assert proc.wait(timeout=600) == 0, "".join(lines)[-3000:]
        reference = cls(data, out, round(time.time() - begin, 2))
        (root / "reference.json").write_text(json.dumps({"seconds": reference.seconds}))
        return reference

    @classmethod
    def read(cls, root: Path) -> "Reference":
        """One that ``make`` left in ``root``."""
        seconds = json.loads((root / "reference.json").read_text())["seconds"]
        return cls(root / "data", root / "reference", seconds)


def load(path: Path | str) -> dict[str, Any]:
    from util.checkpoint.load import load_checkpoint

    return load_checkpoint(str(path))


def one_line_error(call: Callable[..., object], *args: Any) -> str:
    """The message of the UserError ``call(*args)`` raises, checked to be the one line that run_cli
    prints after "error: " (test_bad_input runs that contract on the command line)."""
    import pytest

    from util.cli.errors import UserError

    with pytest.raises(UserError) as refused:
        call(*args)
    message = str(refused.value)
    assert message.strip() and "\n" not in message, message
    return message


def read_log(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]


def checkpoint_names(out: Path) -> set[str]:
    return {p.name for p in out.glob("checkpoint-*.pth")}


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Recursively equal: tensors bitwise (torch.equal, same dtype), containers element by element."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{where}: tensor vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, (
            f"{where}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        )
        assert torch.equal(a, b), f"{where}: tensors differ (max abs diff {(a.double() - b.double()).abs().max()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def cli_batch(cases: dict[str, list[str]], python: Path, script: str = "main_pretrain.py") -> dict[str, Any]:
    """``python <script> <argv>`` for every case, two at a time; returns name -> CompletedProcess.
    ``python`` is meant to be the session's warm one (conftest's ``warm_interpreter``): each run
    is then forked from a process that imported torch, timm and torchvision once (most of a CLI
    run's time), and runs the script's __main__ block as the command line does, with its own
    stdout, stderr and exit status."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        runs = {name: pool.submit(cli, [script, *argv], python=python) for name, argv in cases.items()}
    return {name: run.result() for name, run in runs.items()}


# Ports for the tests' rendezvous: below Linux's ephemeral range (32768-60999), where the kernel hands out no port
# to a bind(0) or to a connection's own end, and a block of its own for each xdist worker. A port the kernel gave
# (bind to 0, then close) could be given again, to another worker or to a client socket, before the rank that was
# told it bound it. Within its block a worker takes the ports in turn from a random start, skipping those in use.
PORT_BLOCK = 1000
PORTS_FROM = 20000


def _port_block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    start = PORTS_FROM + PORT_BLOCK * (int(worker) % 12 if worker.isdigit() else 0)
    return range(start, start + PORT_BLOCK)


_next_ports: Iterator[int] | None = None


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on, that no other test worker is given and that the kernel does not
    hand to a socket of its own choosing meanwhile."""
    import random
    import socket
    from itertools import cycle, islice

    global _next_ports
    block = _port_block()
    if _next_ports is None:
        start = random.randrange(len(block))
        _next_ports = cycle([*block[start:], *block[:start]])
    for port in islice(_next_ports, len(block)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: a rank of an earlier test still holds it, or another program
            return port
    raise RuntimeError(f"no free port from {block.start} to {block.stop - 1}")


@contextmanager
def started_ranks(
    argv: Sequence[str], world_size: int = 2, stdout: int = subprocess.PIPE, **env: str
) -> Iterator[list[subprocess.Popen]]:
    """``argv`` started ``world_size`` times as fresh interpreters, in the environment torchrun gives its
    workers (and ``env``), one thread each, stderr piped; yields the processes, and kills those still
    running when the block ends."""
    shared = {**os.environ, "WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    shared.update(OMP_NUM_THREADS="1", **env)
    ranks = [
        subprocess.Popen(
            argv,
            cwd=REPO,
            env={**shared, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    try:
        yield ranks
    finally:
        for rank in ranks:
            if rank.poll() is None:
                rank.kill()


def run_forked(log: Path, body: Callable[[], None], append: bool = False) -> int:
    """Run ``body()`` in a process forked from this one, its stdout and stderr going to ``log``
    (appended to, or replaced); returns the child's pid. The child never returns: it exits with
    the status of a ``SystemExit`` (``run_cli``'s), 0 when ``body`` returns, and 1, with the
    traceback in ``log``, on any other exception."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC))
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        sys.stdout = sys.stderr = open(fd, "w", buffering=1, closefd=False)  # not pytest's capture
        body()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        os._exit(code)


def counting_step(
    after: Callable[[torch.optim.Optimizer, int], object], optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW
) -> Callable:
    """A replacement for ``optimizer.step`` (a class's: AdamW, or linear probing's LARS) that calls
    ``after(optimizer, k)`` after the k-th step (1-based) it makes: the seam through which tests
    enter faults at a given step."""
    real_step, done = optimizer.step, [0]

    def step(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        result = real_step(self, *args, **kwargs)
        done[0] += 1
        after(self, done[0])
        return result

    return step


DESTROYED_CLEANLY = "destroy_process_group: no DistributedDataParallel alive"


def refuse_destroy_while_ddp_lives() -> None:
    """Make ``destroy_process_group`` fail in this process while a DistributedDataParallel is
    alive (freed afterwards, its reducer can deadlock gloo's destructor: distributed.cleanup), and
    print ``DESTROYED_CLEANLY`` on stderr when it is called with none."""
    import gc

    import torch.distributed as dist

    destroy = dist.destroy_process_group

    def checked(*args: Any, **kwargs: Any) -> None:
        ddp = torch.nn.parallel.DistributedDataParallel
        alive = sum(isinstance(o, ddp) for o in gc.get_objects())
        assert alive == 0, f"destroy_process_group with {alive} DistributedDataParallel alive"
        print(DESTROYED_CLEANLY, file=sys.stderr)
        destroy(*args, **kwargs)

    dist.destroy_process_group = checked


def run_ranks(
    main: Callable[[], None], workdir: Path, world_size: int = 2, timeout: float = 300, exit_codes: Sequence[int] = ()
) -> list[str]:
    """``main()`` in ``world_size`` processes forked from this one, in the environment torchrun
    gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT): a gloo group on
    the CPU, without a fresh interpreter per rank. Each rank runs single-threaded (a forked
    process must not use the parent's thread pool) through ``run_cli``, and fails if it destroys
    the group while a DDP wrapper lives (refuse_destroy_while_ddp_lives); returns each rank's
    stdout and stderr, and fails the test where a rank exits otherwise than with its ``exit_codes``
    (by default 0)."""
    from util.cli.errors import run_cli

    workdir.mkdir(parents=True, exist_ok=True)
    env = {"WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    logs = [workdir / f"rank{rank}.log" for rank in range(world_size)]
    pids = []
    for rank, log in enumerate(logs):

        def rank_main(rank: int = rank) -> None:
            os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
            torch.set_num_threads(1)
            refuse_destroy_while_ddp_lives()
            run_cli(main)

        pids.append(run_forked(log, rank_main))
    codes = [wait_or_kill(pid, time.time() + timeout) for pid in pids]
    outputs = [log.read_text() for log in logs]
    for rank, (code, expected, output) in enumerate(zip(codes, exit_codes or [0] * world_size, outputs, strict=True)):
        assert code == expected, f"rank {rank} exited with {code}:\n{output[-3000:]}"
    return outputs


def wait_or_kill(pid: int, deadline: float) -> int:
    """The exit status of child ``pid`` (-signal if a signal ended it), killed at ``deadline``."""
    while time.time() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@contextmanager
def preserved_signals() -> Iterator[None]:
    """main() installs handlers of the stop signals (SIGINT among them) in this process; put
    pytest's back afterwards."""
    from util.train import interrupt

    saved = {s: signal.getsignal(s) for s in interrupt.SIGNALS}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


@contextmanager
def isolated_interrupts() -> Iterator[None]:
    """util.train.interrupt with no stop requested and no handlers remembered, before and after;
    pytest's signal handlers as they were afterwards."""
    from util.train import interrupt

    interrupt.uninstall()
    try:
        with preserved_signals():
            yield
    finally:
        interrupt.uninstall()


class Budgeted:
    """A file opened for writing that takes ``budget`` bytes: a write that would go past them
    writes what fits, then calls ``over()``, which raises or ends the process."""

    def __init__(self, f, budget: int, over: Callable[[], object]):
        self.f, self.left, self.over = f, budget, over

    def write(self, data):
        if len(data) > self.left:
            self.f.write(data[: self.left])
            self.f.flush()
            self.over()
        self.left -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def budgeted_open(budget: int, over: Callable[[], object], wrap: Callable[[str, str], bool]) -> Callable:
    """An ``open`` (to set as a module's) that gives the files for which ``wrap(path, mode)``
    holds ``budget`` bytes (see Budgeted) and opens every other file as usual."""
    real_open = builtins.open

    def patched(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        return Budgeted(f, budget, over) if wrap(str(path), mode) else f

    return patched


@contextmanager
def serve(folder: Path, pace_s: float = 0.0) -> Iterator[tuple[str, list[str]]]:
    """An HTTP server of ``folder``'s files on localhost, in a thread of this process: its address,
    and the paths asked for so far (a list that grows as requests come; forked ranks ask it too).
    ``pace_s``: a pause before each 128 KiB of a file, as a slow link sends it."""
    asked: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.path)
            super().do_GET()

        def copyfile(self, source, outputfile) -> None:
            while piece := source.read(128 * 1024):
                time.sleep(pace_s)
                outputfile.write(piece)
                outputfile.flush()

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", asked
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def recorded_calls(module: Any, name: str) -> Iterator[list[str]]:
    """The paths ``module.name`` (``os.stat``, ``os.lstat``, ...) is called with inside the block:
    what a network file system would answer one round trip at a time."""
    real, calls = getattr(module, name), []

    def recording(path: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(os.fspath(path))
        return real(path, *args, **kwargs)

    setattr(module, name, recording)
    try:
        yield calls
    finally:
        setattr(module, name, real)


def folder_of_length(root: Path, length: int) -> Path:
    """A folder under ``root`` whose absolute path has ``length`` characters (parts of at most 200)."""
    path = str(root.resolve())
    while len(path) < length:
        path = os.path.join(path, "d" * min(200, length - len(path) - 1))
    os.makedirs(path)
    assert len(path) == length
    return Path(path)
