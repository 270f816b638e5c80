"""End-to-end tests of the pre-training entry point (main_pretrain.py) on CPU.

The session's reference run (``pretrain_reference``: 3 epochs of 6 iterations on 48 CIFAR images,
the mini model, every checkpoint kept, pictures after epochs 0 and 2) serves several tests: its
outputs, and the exact resumes (from an epoch boundary, from inside an epoch, with and without
data-loader workers) that must reproduce it bit for bit.
"""

import hashlib
import math
import os
import shlex
import signal
import textwrap
import time
from argparse import Namespace
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import (
    CLASSES,
    DESTROYED_CLEANLY,
    REFERENCE_EXTRAS,
    REPO,
    RESUMABLE,
    RESUMABLE_BLR,
    RESUMABLE_EPOCHS,
    RESUMABLE_ITERS,
    TINY,
    all_finite,
    assert_same,
    checkpoint_names,
    cli,
    cli_batch,
    counting_step,
    isolated_interrupts,
    load,
    make_dataset,
    read_log,
    run_forked,
    run_pretrain,
    run_ranks,
    wait_or_kill,
)
from PIL import Image

import main_pretrain
import models_mae
from util.cli.args import effective_lr
from util.cli.errors import NonFiniteLoss, run_cli
from util.lr_sched import adjust_learning_rate, lr_at
from util.train import interrupt
from util.train.checkpointer import EpochProgress
from util.train.run import start

# Flags of the reference run; resumed runs use the same ones (the schedule depends on --epochs).
EPOCHS, ITERS = RESUMABLE_EPOCHS, RESUMABLE_ITERS  # 48 images / batch 8
RUN = [*RESUMABLE, *REFERENCE_EXTRAS]  # run_pretrain adds --log_dir <output_dir>, as the reference has


@pytest.fixture(autouse=True)
def _isolate():
    with isolated_interrupts():
        yield


@pytest.fixture(scope="module")
def data(pretrain_reference) -> Path:
    return pretrain_reference.data  # 48 images in 3 class folders


@pytest.fixture(scope="module")
def reference(pretrain_reference) -> Path:
    """The uninterrupted run's folder, with every checkpoint (also those inside epochs)."""
    return pretrain_reference.out


def _without_args(ckpt: dict) -> dict:
    return {k: v for k, v in ckpt.items() if k != "args"}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# A short run: lower loss and every output
def test_training_lowers_loss_and_writes_outputs(reference):
    log = read_log(reference)
    assert [line["epoch"] for line in log] == list(range(EPOCHS)), "log.txt needs one JSON line per epoch"
    losses = [line["train_loss"] for line in log]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.8 * losses[0], f"loss did not go down: {losses}"
    assert all(line["train_lr"] > 0 for line in log)

    # --keep_last 0 keeps them all: each epoch's, and those after iterations 2 and 4 (--ckpt_every_steps 2).
    kept = {f"checkpoint-{e}{step}.pth" for e in range(EPOCHS) for step in ("", "-step2", "-step4")}
    assert checkpoint_names(reference) == kept
    ckpt = load(reference / f"checkpoint-{EPOCHS - 1}.pth")
    assert {"model", "optimizer", "epoch", "step", "scaler", "args", "rng", "extra"} <= set(ckpt)
    assert ckpt["epoch"] == EPOCHS - 1 and ckpt["step"] is None
    assert len(ckpt["rng"]) == 1
    assert isinstance(ckpt["args"], Namespace)
    assert ckpt["args"].lr == pytest.approx(RESUMABLE_BLR * 8 / 256)  # blr * effective batch / 256
    assert all_finite(ckpt["model"])
    first = load(reference / "checkpoint-0.pth")["model"]
    assert any(not torch.equal(first[k], ckpt["model"][k]) for k in first), "weights did not change"

    # Pictures after epochs 0 and 2 (--vis_freq 2, 2 is also the last), none after epoch 1.
    pictures = sorted(p.name for p in reference.glob("reconstruction-*.png"))
    assert pictures == [f"reconstruction-{e}.png" for e in (0, EPOCHS - 1)]
    with Image.open(reference / "reconstruction-0.png") as img:
        assert img.mode == "RGB"
        # 8 images, one per row; original | masked | reconstruction | pasted, upscaled to >= 512 px.
        assert img.width >= 512 and img.width % (4 * 32) == 0
        assert img.height * 4 == img.width * 8

    events = list(reference.glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0]), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    assert {"train_loss", "lr"} <= set(acc.Tags()["scalars"])
    # A loss at every check point: the first iteration, every 2nd (--print_freq, --ckpt_every_steps), the last.
    check_points = [s for s in range(ITERS) if s == 0 or (s + 1) % 2 == 0 or s == ITERS - 1]
    assert len(acc.Scalars("train_loss")) == EPOCHS * len(check_points) == EPOCHS * 4
    # On the scalars' axis (epoch × 1000), at the end of the epoch each shows (epochs 0 and 2).
    assert [e.step for e in acc.Images("reconstructions")] == [1000, EPOCHS * 1000]


def test_a_finished_run_resumed_finishes_the_pruning_a_kill_cut(tmp_path):
    """A kill between the removals of the last save's pruning leaves an old checkpoint that nothing
    would remove (a finished run trains, and so saves, no more): resuming it prunes, and touches
    nothing else (found by the fine-tuning fault campaign's review)."""
    out = tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "0"]
    run_pretrain(make_dataset(tmp_path / "data", 3), out, *flags, "--keep_last", "1")
    kept = {p.name: _sha256(p) for p in out.glob("checkpoint-*.pth")}
    assert set(kept) == {"checkpoint-0.pth", "checkpoint-1.pth"}  # epoch 0: a multiple of --save_freq 20
    (out / "checkpoint-1-step1.pth").write_bytes((out / "checkpoint-1.pth").read_bytes())  # the one left
    run_pretrain(tmp_path / "data", out, *flags, "--keep_last", "1", "--resume", "auto")
    assert {p.name: _sha256(p) for p in out.glob("checkpoint-*.pth")} == kept


def test_pictures_every_nth_epoch_and_after_the_last(tmp_path):
    """--vis_freq 2 over 4 epochs: after epochs 0 and 2, and after the last one (3), not a multiple."""
    out = tmp_path / "out"
    flags = ["--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "4", "--warmup_epochs", "0"]
    run_pretrain(make_dataset(tmp_path / "data", 3), out, *flags, "--vis_freq", "2", "--vis_images", "2")
    pictures = sorted(p.name for p in out.glob("reconstruction-*.png"))
    assert pictures == [f"reconstruction-{e}.png" for e in (0, 2, 3)]


# ---------------------------------------------------------------------------------------------
# Exact resume
def _stop_at(monkeypatch, epoch: int, step: int, how: Callable[[], object]) -> None:
    """Call ``how()`` right before the check point after iteration ``step`` of ``epoch``."""
    original = EpochProgress.after_step

    def hooked(self, step_, loss, lr):
        if (self.epoch, step_) == (epoch, step):
            how()
        original(self, step_, loss, lr)

    monkeypatch.setattr(EpochProgress, "after_step", hooked)


def test_resume_inside_epoch_is_exact_with_workers(reference, data, tmp_path, monkeypatch):
    # Run B: same flags, stopped by a request (as SIGTERM would) after iteration 0 of epoch 1.
    stopped = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        _stop_at(patch, 1, 0, lambda: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(interrupt.Interrupted) as stop:
            run_pretrain(data, stopped, *RUN)
    assert stop.value.checkpoint == str(stopped / "checkpoint-1-step1.pth")
    in_epoch_0 = {"checkpoint-0-step2.pth", "checkpoint-0-step4.pth", "checkpoint-0.pth"}
    assert checkpoint_names(stopped) == {*in_epoch_0, "checkpoint-1-step1.pth"}
    mid = load(stopped / "checkpoint-1-step1.pth")
    assert (mid["epoch"], mid["step"]) == (1, 1)
    assert_same(_without_args(load(stopped / "checkpoint-0.pth")), _without_args(load(reference / "checkpoint-0.pth")))

    # Run C: resume there with 2 data-loader workers; it must end exactly where the reference ended.
    resumed = tmp_path / "resumed"
    run_pretrain(
        data,
        resumed,
        *RUN,
        "--resume",
        str(stopped / "checkpoint-1-step1.pth"),
        "--num_workers",
        "2",
        init_seed=12345,  # the weights must come from the checkpoint
    )
    final = f"checkpoint-{EPOCHS - 1}.pth"
    assert_same(_without_args(load(resumed / final)), _without_args(load(reference / final)))
    last_picture = f"reconstruction-{EPOCHS - 1}.png"
    assert (resumed / last_picture).read_bytes() == (reference / last_picture).read_bytes()
    # log.txt comes from the checkpoint's history: epoch 0 as the stopped run logged it, and epoch 1's
    # average over all its iterations (the mid-epoch checkpoint carries the sums), as uninterrupted.
    assert read_log(resumed) == read_log(reference)


def test_resume_auto_at_epoch_boundary_skips_corrupt_newest(reference, data, tmp_path, capsys):
    out = tmp_path / "auto"
    out.mkdir()
    for name in ("checkpoint-0-step4.pth", "checkpoint-1.pth"):
        (out / name).write_bytes((reference / name).read_bytes())
    # A newer, truncated checkpoint (as a crash during a copy would leave): it must be skipped.
    whole = (reference / f"checkpoint-{EPOCHS - 1}.pth").read_bytes()
    (out / f"checkpoint-{EPOCHS - 1}-step1.pth").write_bytes(whole[: len(whole) // 2])
    # The log and TensorBoard events of the run that wrote them, ahead of the checkpoint the resumed run falls back to.
    for logged in [reference / "log.txt", *reference.glob("events.out.tfevents.*")]:
        (out / logged.name).write_bytes(logged.read_bytes())

    capsys.readouterr()
    run_pretrain(data, out, *RUN, "--resume", "auto", "--keep_last", "1", init_seed=12345)
    printed = capsys.readouterr().out
    assert "skipping" in printed and f"checkpoint-{EPOCHS - 1}-step1.pth" in printed
    assert f"resumed model from {out / 'checkpoint-1.pth'}" in printed
    assert f"resuming at epoch {EPOCHS - 1}, iteration 0" in printed

    final = f"checkpoint-{EPOCHS - 1}.pth"
    assert_same(_without_args(load(out / final)), _without_args(load(reference / final)))
    # Pruning with --keep_last 1 (the default): only the final checkpoint stays.
    assert checkpoint_names(out) == {final}
    assert read_log(out) == read_log(reference), "each epoch once, as logged by the uninterrupted run"
    # TensorBoard too: the events after checkpoint-1 are hidden (purged), the resumed run's drawn instead of
    # over them; epoch 2's check points are the uninterrupted run's, so the curves are the same.
    assert len(list(out.glob("events.out.tfevents.*"))) == 2
    assert _tensorboard(out) == _tensorboard(reference)


def _tensorboard(folder: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard shows of ``folder``'s runs: each scalar's (x, value) points; the pictures' x."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    shown = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}
    return {**shown, "pictures": [(e.step, 0.0) for e in acc.Images("reconstructions")]}


def test_resume_auto_without_checkpoint_starts_from_scratch(data, tmp_path, capsys, monkeypatch):
    class Stop(Exception):
        pass

    def stop(*a, **k):
        raise Stop

    monkeypatch.setattr(main_pretrain, "wrap_for_training", stop)
    with pytest.raises(Stop):
        run_pretrain(data, tmp_path / "empty", *RUN, "--resume", "auto")
    assert "no checkpoint" in capsys.readouterr().out


def test_signal_in_single_process_run_checkpoints_and_exits(reference, data, tmp_path, monkeypatch, capsys):
    """A real signal (preemption) in a plain single-process run: checkpoint at the next check
    point, stop, and exit (through the CLI wrapper) with status 128 + the signal's number."""
    out = tmp_path / "signalled"
    _stop_at(monkeypatch, EPOCHS - 1, 0, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    resume_from = str(reference / f"checkpoint-{EPOCHS - 2}.pth")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: run_pretrain(data, out, *RUN, "--resume", resume_from))
    assert stop.value.code == 128 + signal.SIGUSR1
    written = out / f"checkpoint-{EPOCHS - 1}-step1.pth"
    assert checkpoint_names(out) == {written.name}
    assert str(written) in capsys.readouterr().err
    ckpt = load(written)
    assert (ckpt["epoch"], ckpt["step"]) == (EPOCHS - 1, 1)


# ---------------------------------------------------------------------------------------------
# Initial weights follow --seed
def _initial_weights(data: Path, out: Path, monkeypatch, global_seed: int, *flags: str) -> dict:
    captured = {}

    class Stop(Exception):
        pass

    def capture(model, args):
        captured.update({k: v.clone() for k, v in model.state_dict().items()})
        raise Stop

    monkeypatch.setattr(main_pretrain, "wrap_for_training", capture)
    with pytest.raises(Stop):
        run_pretrain(data, out, "--epochs", "1", *flags, init_seed=global_seed)
    return captured


def test_seed_determines_initial_weights(data, tmp_path, monkeypatch):
    a = _initial_weights(data, tmp_path / "a", monkeypatch, 1, "--seed", "0")
    b = _initial_weights(data, tmp_path / "b", monkeypatch, 2, "--seed", "0")
    c = _initial_weights(data, tmp_path / "c", monkeypatch, 1, "--seed", "1")
    differing = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert not differing, (
        f"same --seed, different initial weights ({len(differing)} tensors, e.g. {differing[:2]}): "
        "main_pretrain.main builds the model before run.start seeds the generators"
    )
    assert any(not torch.equal(a[k], c[k]) for k in a), "--seed 0 and --seed 1 start from the same weights"


# ---------------------------------------------------------------------------------------------
# Non-finite loss
def test_nonfinite_loss_stops_and_keeps_last_checkpoint(reference, data, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    newest = out / "checkpoint-1-step1.pth"
    seen = {}
    build = main_pretrain.build_model

    def build_poisoned(*given):
        model = build(*given)
        forward_loss = model.forward_loss
        calls = [0]

        def poisoned(*a, **k):
            loss = forward_loss(*a, **k)
            calls[0] += 1
            if calls[0] >= 2:  # from iteration 1 of epoch 1 on (the run resumes at epoch 1)
                if "sha" not in seen:
                    seen["sha"], seen["mtime"] = _sha256(newest), newest.stat().st_mtime_ns
                loss = loss * float("nan")
            return loss

        model.forward_loss = poisoned
        return model

    monkeypatch.setattr(main_pretrain, "build_model", build_poisoned)
    with pytest.raises(NonFiniteLoss) as err:
        run_pretrain(
            data,
            out,
            *RUN,
            "--resume",
            str(reference / "checkpoint-0.pth"),
            "--ckpt_every_steps",
            "1",
            "--print_freq",
            "20",
        )
    message = str(err.value)
    assert "\n" not in message
    assert "epoch 1" in message and "iteration 1" in message, message
    assert "sha" in seen, "the poisoned iteration never ran"
    assert checkpoint_names(out) == {newest.name}, "a checkpoint was written after the bad iteration"
    assert (_sha256(newest), newest.stat().st_mtime_ns) == (seen["sha"], seen["mtime"])
    assert all_finite(load(newest)["model"])


# ---------------------------------------------------------------------------------------------
# Two processes (gloo)
WRAPPER = textwrap.dedent(
    """
    import os, sys
    sys.path[:0] = [{repo!r}, os.path.join({repo!r}, "tests")]
    import torch
    import main_pretrain
    from helpers import refuse_destroy_while_ddp_lives

    refuse_destroy_while_ddp_lives()

    built = []
    build = main_pretrain.build_model
    main_pretrain.build_model = lambda *given: built.append(build(*given)) or built[-1]
    out = sys.argv[1]
    main_pretrain.main(main_pretrain.get_args_parser().parse_args(sys.argv[2:]))
    torch.save(built[0].state_dict(), os.path.join(out, "rank%s.pt" % os.environ["RANK"]))
    """
)


def test_torchrun_two_processes_identical_weights(tmp_path):
    data = make_dataset(tmp_path / "data", 11)  # 33 images: 2 iterations of 2 x 8 per epoch
    out = tmp_path / "out"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    argv = [*TINY, "--model", "mae_vit_mini_patch4", "--batch_size", "8", "--epochs", "2", "--warmup_epochs", "1"]
    argv += ["--vis_freq", "1", "--data_path", str(data), "--output_dir", str(out), "--log_dir", str(out)]

    def torchrun() -> None:
        # `python -m torch.distributed.run ...` without a fresh interpreter for the launcher; its
        # workers are fresh interpreters, as torchrun starts them.
        from torch.distributed import run

        os.environ["OMP_NUM_THREADS"] = "1"
        run.main(["--standalone", "--nproc_per_node=2", str(wrapper), str(out), *argv])

    log = tmp_path / "torchrun.log"
    code = wait_or_kill(run_forked(log, torchrun), time.time() + 300)
    assert code == 0, log.read_text()[-6000:]

    rank0, rank1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert_same(rank0, rank1, "rank0 vs rank1")
    ckpt = load(out / "checkpoint-1.pth")
    assert_same(ckpt["model"], rank0, "checkpoint vs rank0")
    assert len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"]), "ranks must draw different masks"
    assert ckpt["args"].lr == pytest.approx(1e-3 * 8 * 2 / 256)  # effective batch over both ranks
    assert ckpt["args"].world_size == 2
    assert [line["epoch"] for line in read_log(out)] == [0, 1], "log.txt must be written by rank 0 only"
    assert all_finite(rank0)
    assert any(not torch.equal(v, load(out / "checkpoint-0.pth")["model"][k]) for k, v in rank0.items())
    assert sorted(p.name for p in out.glob("reconstruction-*.png")) == ["reconstruction-0.png", "reconstruction-1.png"]
    # log.txt's loss is the epoch's over both ranks, as the official one (its meters are summed over processes):
    # each TensorBoard point here is one iteration's loss averaged over the ranks.
    points = _tensorboard(out)["train_loss"]
    for line in read_log(out):
        epoch_points = [value for x, value in points if line["epoch"] * 1000 < x <= (line["epoch"] + 1) * 1000]
        assert len(epoch_points) == 2
        assert line["train_loss"] == pytest.approx(sum(epoch_points) / 2, rel=1e-6)


def test_two_ranks_resumed_inside_an_epoch_log_the_uninterrupted_epoch_loss(tmp_path):
    """A mid-epoch checkpoint keeps each rank's loss sums, so that the resumed epoch's loss over both ranks, in
    log.txt, is the uninterrupted run's to the last digit (not rank 0's sums taken by both ranks)."""
    data = make_dataset(tmp_path / "data", 11)  # 33 images: 4 iterations of 2 x 4 per epoch
    argv = [*TINY, "--model", "mae_vit_mini_patch4", "--batch_size", "4", "--epochs", "2", "--ckpt_every_steps", "2"]
    argv += ["--keep_last", "0", "--vis_freq", "0", "--data_path", str(data), "--log_dir", ""]

    def ranks(out: Path, *extra: str) -> None:
        flags = main_pretrain.get_args_parser().parse_args([*argv, "--output_dir", str(out), *extra])
        run_ranks(lambda: main_pretrain.main(flags), out / "ranks")

    ranks(tmp_path / "whole")
    ranks(tmp_path / "resumed", "--resume", str(tmp_path / "whole" / "checkpoint-1-step2.pth"))
    sums = load(tmp_path / "whole" / "checkpoint-1-step2.pth")["meters"]["sums"]
    assert len(sums) == 2 and sums[0]["loss"] != sums[1]["loss"], "each rank's own"
    assert read_log(tmp_path / "resumed") == read_log(tmp_path / "whole")


def test_a_stop_on_one_rank_stops_both_and_destroys_the_group_before_exit(tmp_path):
    """SIGUSR1 to rank 0 alone after its second optimizer step: at the next check point (a
    collective) both ranks save one checkpoint and exit as stopped, having destroyed the process
    group with no DDP wrapper alive, not left it to the interpreter's shutdown (where gloo's
    destructor can hang holding the GIL: distributed.cleanup)."""
    data = make_dataset(tmp_path / "data", 11)  # 33 images: 4 iterations of 2 x 4 per epoch
    out = tmp_path / "out"
    argv = [*TINY, "--model", "mae_vit_mini_patch4", "--batch_size", "4", "--epochs", "2", "--print_freq", "3"]
    argv += ["--vis_freq", "0", "--data_path", str(data), "--output_dir", str(out), "--log_dir", ""]

    def rank_main() -> None:
        if os.environ["RANK"] == "0":
            torch.optim.AdamW.step = counting_step(lambda _, k: k == 2 and os.kill(os.getpid(), signal.SIGUSR1))
        main_pretrain.main(main_pretrain.get_args_parser().parse_args(argv))

    # Each rank exits with its own signal's status; rank 1 got none, and exits as if sent SIGTERM.
    logs = run_ranks(rank_main, tmp_path / "ranks", exit_codes=[128 + signal.SIGUSR1, 128 + signal.SIGTERM])
    assert all(DESTROYED_CLEANLY in log for log in logs), "\n".join(log[-1500:] for log in logs)
    assert checkpoint_names(out) == {"checkpoint-0-step3.pth"}  # the check point after the third iteration


# ---------------------------------------------------------------------------------------------
# Bad input on the command line: exit status 2 and one line on stderr naming the flag or file
class _Malicious:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], list[str]]]:
    data = make_dataset(tmp / "data", 11)  # 33 images
    empty = tmp / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    corrupt = make_dataset(tmp / "corrupt", 11)
    (corrupt / CLASSES[-1] / "0010.jpg").unlink()  # 32 good + 1 bad: 3 full batches of 11, none dropped
    good_jpg = (corrupt / CLASSES[0] / "0000.jpg").read_bytes()
    # Sorts second, so that the reconstruction picture does not load it: a data-loader worker does.
    (corrupt / CLASSES[0] / "0000_bad.jpg").write_bytes(good_jpg[: len(good_jpg) // 2])

    model = models_mae.mae_vit_tiny_patch4(img_size=32)
    whole = tmp / "whole.pth"
    torch.save({"model": model.state_dict(), "epoch": 0, "args": Namespace(model="x")}, whole)
    blob = whole.read_bytes()
    (tmp / "truncated.pth").write_bytes(blob[: len(blob) // 2])
    torch.save({"foo": 1}, tmp / "foreign.pth")
    torch.save({"model": models_mae.mae_vit_tiny_patch16(img_size=32).state_dict(), "epoch": 0}, tmp / "other.pth")
    marker = tmp / "MARKER"
    torch.save({"model": _Malicious(f"touch {shlex.quote(str(marker))}")}, tmp / "malicious.pth")

    known = list(models_mae.MODELS)
    return {
        "data_missing": (["--data_path", str(tmp / "nowhere")], ["--data_path", "nowhere"]),
        "data_empty": (["--data_path", str(empty)], ["--data_path", str(empty)]),
        "data_corrupt_jpg": (
            ["--data_path", str(corrupt), "--num_workers", "2", "--batch_size", "11"],
            ["0000_bad.jpg"],
        ),
        "unknown_model": (["--data_path", str(data), "--model", "mae_vit_gigantic"], ["mae_vit_gigantic", *known]),
        "mask_ratio_1": (["--data_path", str(data), "--mask_ratio", "1.0"], ["--mask_ratio"]),
        "input_size_30": (["--data_path", str(data), "--input_size", "30"], ["--input_size"]),
        "batch_size_0": (["--data_path", str(data), "--batch_size", "0"], ["--batch_size"]),
        "batch_larger_than_data": (["--data_path", str(data), "--batch_size", "64"], ["--batch_size"]),
        "resume_missing": (["--data_path", str(data), "--resume", str(tmp / "gone.pth")], ["gone.pth"]),
        "resume_truncated": (["--data_path", str(data), "--resume", str(tmp / "truncated.pth")], ["truncated.pth"]),
        "resume_foreign": (["--data_path", str(data), "--resume", str(tmp / "foreign.pth")], ["foreign.pth"]),
        "resume_other_model": (
            ["--data_path", str(data), "--resume", str(tmp / "other.pth")],
            ["other.pth", "shape"],
        ),
        "resume_malicious": (["--data_path", str(data), "--resume", str(tmp / "malicious.pth")], ["malicious.pth"]),
    }


CLI_CASES = [
    "data_missing",
    "data_empty",
    "data_corrupt_jpg",
    "unknown_model",
    "mask_ratio_1",
    "input_size_30",
    "batch_size_0",
    "batch_larger_than_data",
    "resume_missing",
    "resume_truncated",
    "resume_foreign",
    "resume_other_model",
    "resume_malicious",
]


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory, warm_interpreter):
    """Every bad-input case as its own `python main_pretrain.py ...` run (forked from the session's
    warm interpreter, see helpers.cli_batch), and one case as a plain, separate process."""
    tmp = tmp_path_factory.mktemp("cli")
    cases = _cli_cases(tmp)
    assert sorted(cases) == sorted(CLI_CASES)

    def argv(name):
        dirs = ["--output_dir", str(tmp / "out" / name), "--log_dir", str(tmp / "out" / name)]
        return [*TINY, "--epochs", "1", "--vis_freq", "0", *dirs, *cases[name][0]]

    with ThreadPoolExecutor(max_workers=2) as pool:
        plain = pool.submit(cli, ["main_pretrain.py", *argv("data_missing")])
        results = cli_batch({name: argv(name) for name in CLI_CASES}, warm_interpreter)
        results["data_missing (own process)"] = plain.result()
    return tmp, cases, results


@pytest.mark.parametrize("case", [*CLI_CASES, "data_missing (own process)"])
def test_cli_bad_input_gives_one_line_error(cli_results, case):
    tmp, cases, results = cli_results
    result = results[case]
    _, expected = cases[case.split(" ")[0]]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, f"exit status {result.returncode}; stderr ends:\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), result.stderr[-2000:]
    assert sum(line.startswith("error:") for line in lines) == 1
    for word in expected:
        assert word in lines[-1], f"{word!r} not in {lines[-1]!r}"
    if case == "resume_malicious":
        marker = tmp / "MARKER"
        assert not marker.exists(), "loading the checkpoint ran its pickled code"
        # The file is truly malicious: an unsafe load runs its (harmless) command.
        torch.load(tmp / "malicious.pth", weights_only=False)
        assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Learning-rate schedule
def test_lr_schedule_warmup_and_cosine():
    args = Namespace(lr=1.0, min_lr=0.1, warmup_epochs=2, epochs=10)
    assert lr_at(0, args) == 0.0
    assert lr_at(0.5, args) == pytest.approx(0.25)
    assert lr_at(1, args) == pytest.approx(0.5)
    assert lr_at(2, args) == pytest.approx(1.0)  # peak at the end of warm-up
    assert lr_at(4, args) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + 2**-0.5))  # a quarter of the cosine
    assert lr_at(6, args) == pytest.approx(0.55)  # half-way: mean of lr and min_lr
    assert lr_at(10, args) == pytest.approx(0.1)
    assert lr_at(12, args) == pytest.approx(0.1)  # never below min_lr
    values = [lr_at(e / 10, args) for e in range(0, 101)]
    peak = values.index(max(values))
    assert all(a <= b for a, b in zip(values[: peak + 1], values[1 : peak + 1], strict=False))
    assert all(a >= b for a, b in zip(values[peak:], values[peak + 1 :], strict=False))
    assert lr_at(0, Namespace(lr=1.0, min_lr=0.0, warmup_epochs=0, epochs=5)) == 1.0  # no warm-up


def test_lr_schedule_is_bitwise_the_official_expression():
    """The cosine is computed as the official util/lr_sched.py writes it, so that a run's lr is the
    official one to the last bit (another order of the same operations differs at ~20% of steps)."""
    args = Namespace(lr=2.5e-4, min_lr=1e-6, warmup_epochs=5, epochs=100)  # the ViT-B fine-tuning recipe
    iterations = 1251
    for epoch in range(args.warmup_epochs, args.epochs):
        for step in range(0, iterations, 7):
            at = step / iterations + epoch
            official = args.min_lr + (args.lr - args.min_lr) * 0.5 * (
                1.0 + math.cos(math.pi * (at - args.warmup_epochs) / (args.epochs - args.warmup_epochs))
            )
            assert lr_at(at, args) == official, (epoch, step)


def test_adjust_learning_rate_applies_layer_scale():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p]}, {"params": [q], "lr_scale": 0.5}], lr=123.0)
    lr = adjust_learning_rate(opt, 1.0, Namespace(lr=2.0, min_lr=0.0, warmup_epochs=2, epochs=10))
    assert lr == pytest.approx(1.0)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([1.0, 0.5])


def test_effective_lr():
    args = Namespace(batch_size=16, accum_iter=4, lr=None, blr=1e-3)
    assert effective_lr(args, 1) == pytest.approx(1e-3 * 64 / 256)
    assert effective_lr(args, 8) == pytest.approx(1e-3 * 512 / 256)
    args.lr = 0.01
    assert effective_lr(args, 8) == 0.01  # an absolute --lr wins


def test_start_prints_the_base_lr_of_the_lr_it_uses(tmp_path, capsys):
    # As the official code prints it: lr * 256 / effective batch, not the --blr an --lr overrides.
    argv = ["--lr", "0.01", "--batch_size", "64", "--output_dir", str(tmp_path), "--log_dir", "", "--device", "cpu"]
    with isolated_interrupts():
        start(main_pretrain.get_args_parser().parse_args(argv), main_pretrain.FALLBACKS)
    assert "effective batch: 64  lr: 1.000e-02 (base lr 4.000e-02)" in capsys.readouterr().out


def test_resuming_a_finished_run_says_there_is_nothing_to_train(reference, data, tmp_path, capsys):
    capsys.readouterr()
    run_pretrain(data, tmp_path / "again", *RUN, "--resume", str(reference / f"checkpoint-{EPOCHS - 1}.pth"))
    printed = capsys.readouterr().out
    assert f"nothing to train: the run already finished its {EPOCHS} epochs" in printed
    assert "start training" not in printed and "Epoch: [" not in printed
