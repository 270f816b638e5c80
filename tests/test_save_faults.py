"""What a save leaves behind (issue 13, items 1, 5, 6): checkpoints hold only finite weights and
optimizer state, a failed write (a full disk) is one line naming the file, and log.txt agrees
with the checkpoint a run continues from."""

import errno
import json
import os
import shutil
import sys
from argparse import Namespace
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import (  # noqa: E402
    all_finite,
    budgeted_open,
    checkpoint_names,
    counting_step,
    isolated_interrupts,
    load,
    make_dataset,
    run_pretrain,
)

from util import atomic
from util.checkpoint import state as checkpoint  # noqa: E402
from util.cli.errors import NonFiniteLoss, UserError, divergence_advice, run_cli  # noqa: E402
from util.train import progress as logger
from util.train.checkpointer import Checkpointer  # noqa: E402
from util.train.precision import LossScaler  # noqa: E402
from util.train.progress import RunLog  # noqa: E402

RUN = ["--epochs", "2", "--warmup_epochs", "1", "--print_freq", "1", "--vis_freq", "0"]  # 3 iterations an epoch


@pytest.fixture(autouse=True)
def _isolate():
    with isolated_interrupts():
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), 16)  # 48 images: 3 iterations of 16


def _state(tmp_path: Path) -> checkpoint.TrainState:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    args = Namespace(output_dir=str(tmp_path), keep_last=0, save_freq=1, epochs=5, device="cpu")
    return checkpoint.TrainState(model, optimizer, LossScaler("fp32"), args)


# ---------------------------------------------------------------------------------------------
# 1. Only finite weights and optimizer state are saved
def _poison(state: checkpoint.TrainState, where: str) -> None:
    weight = state.model[0].weight
    with torch.no_grad():
        if where == "weight_inf":
            weight[0, 0] = float("inf")
        elif where == "weight_nan":
            state.model[1].bias[1] = float("nan")
        elif where == "weight_runaway":  # finite, but the next forward pass overflows (issue: --lr 1e30)
            weight.mul_(1e30)
        elif where == "optimizer_state":  # exp_avg_sq of a gradient past 1e19
            state.optimizer.state[weight]["exp_avg_sq"][0, 0] = float("inf")


@pytest.mark.parametrize("where", ["weight_inf", "weight_nan", "weight_runaway", "optimizer_state"])
def test_save_refuses_non_finite_state_and_keeps_the_last_checkpoint(tmp_path, where):
    state = _state(tmp_path)
    good = checkpoint.save_checkpoint(state, 0)
    before = Path(good).read_bytes()
    _poison(state, where)
    for step in (None, 2):  # an epoch end, and a --ckpt_every_steps or preemption save
        with pytest.raises(NonFiniteLoss) as err:
            checkpoint.save_checkpoint(state, 1, step)
        message = str(err.value)
        assert "\n" not in message and "not finite" in message and "last checkpoint stays intact" in message
        assert checkpoint.checkpoint_name(1, step) in message
    assert checkpoint_names(tmp_path) == {"checkpoint-0.pth"} and Path(good).read_bytes() == before


def test_save_accepts_large_finite_weights(tmp_path):
    state = _state(tmp_path)
    with torch.no_grad():
        state.model[0].weight.fill_(1e6)
    assert checkpoint.save_checkpoint(state, 0)


def _poison_step(monkeypatch, at: int, **kw) -> None:
    """The optimizer's ``at``-th step (1-based) turns the weights into runaway ones, 1e30 times larger."""

    def poison(optimizer: torch.optim.Optimizer, k: int) -> None:
        if k == at:
            with torch.no_grad():
                for group in optimizer.param_groups:
                    for p in group["params"]:
                        p.mul_(1e30)

    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step(poison))


@pytest.mark.parametrize("mid_epoch", [False, True], ids=["epoch_end", "ckpt_every_steps"])
def test_runaway_last_update_before_a_save_is_not_saved(data, tmp_path, monkeypatch, mid_epoch):
    """The update of the last step before a save is checked by no loss: the save checks it."""
    out = tmp_path / "out"
    flags = ["--ckpt_every_steps", "1"] if mid_epoch else []
    _poison_step(monkeypatch, at=2 if mid_epoch else 3)  # iteration 1 / the last of epoch 0
    with pytest.raises(NonFiniteLoss) as err:
        run_pretrain(data, out, *RUN, "--lr", "1e-4", *flags)
    message = str(err.value)
    assert "epoch 0, iteration 2" in message if mid_epoch else "end of epoch 0" in message, message
    assert message.endswith("Lower --lr"), "--lr was given: say --lr, not --blr (and no wider precision than fp32)"
    kept = {"checkpoint-0-step1.pth"} if mid_epoch else set()
    assert checkpoint_names(out) == kept
    for name in kept:
        assert all_finite(load(out / name)["model"])


@pytest.mark.parametrize("lr_flags, said", [(["--lr", "1e-4"], "--lr"), (["--blr", "1e-3"], "--blr")])
def test_nan_loss_message_names_the_lr_flag_given(data, tmp_path, monkeypatch, lr_flags, said):
    import main_pretrain

    build = main_pretrain.build_model

    def build_poisoned(*given):
        model = build(*given)
        model.forward_loss = lambda *a, **k: torch.tensor(float("nan"), requires_grad=True)
        return model

    monkeypatch.setattr(main_pretrain, "build_model", build_poisoned)
    with pytest.raises(NonFiniteLoss, match=f"Lower {said}$"):  # fp32 on the CPU: no wider precision to try
        run_pretrain(data, tmp_path / "out", *RUN, *lr_flags)


@pytest.mark.parametrize(
    "precision, advice",
    [("fp16", "Lower --blr, or try --precision bf16 or fp32"), ("bf16", "Lower --blr, or try --precision fp32")],
)
def test_a_diverged_run_is_advised_a_wider_precision_than_its_own(precision, advice):
    assert divergence_advice(Namespace(precision=precision, lr_given=False)) == advice


# ---------------------------------------------------------------------------------------------
# 5. A full disk: one line naming the file, nothing partial, the earlier checkpoint loads
def _full_disk(monkeypatch, module, after_bytes: int = 1000, only: str = "") -> None:
    """Files that ``module`` opens for writing (whose name contains ``only``) take ``after_bytes``
    bytes, then fail as a full disk does."""

    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def wrap(path: str, mode: str) -> bool:
        return ("w" in mode or "a" in mode) and only in path

    monkeypatch.setattr(module, "open", budgeted_open(after_bytes, full, wrap), raising=False)


def _before_the_second_save(monkeypatch, fault: Callable[[], object]) -> None:
    """``fault()`` just before the run writes its second checkpoint (checkpoint-1.pth)."""
    real_save, saves = Checkpointer.save, [0]

    def second_save_meets_the_fault(self, epoch, step=None):
        saves[0] += 1
        if saves[0] == 2:
            fault()
        return real_save(self, epoch, step)

    monkeypatch.setattr(Checkpointer, "save", second_save_meets_the_fault)


def test_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_earlier_one(data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _before_the_second_save(monkeypatch, lambda: _full_disk(monkeypatch, atomic, only=".pth"))
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: run_pretrain(data, out, *RUN))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    target = out / "checkpoint-1.pth"
    assert err[0].startswith(f"error: cannot write checkpoint {target}: No space left on device"), err[0]
    assert "MiB are free" in err[0] and "intact" in err[0]
    assert checkpoint_names(out) == {"checkpoint-0.pth"} and not list(out.glob("*.tmp*")), "nothing partial"
    assert load(out / "checkpoint-0.pth")["epoch"] == 0


@pytest.mark.parametrize("gone", ["removed", "moved"])
def test_an_output_dir_removed_under_the_run_is_one_line(data, tmp_path, monkeypatch, capsys, gone):
    """A clean-up or a purged scratch space removes --output_dir while the run trains, or a user renames it: its
    next checkpoint is one line saying so (it was a traceback from measuring the free space of a folder that is
    gone)."""
    out = tmp_path / "out"
    gone_now = (lambda: shutil.rmtree(out)) if gone == "removed" else (lambda: out.rename(tmp_path / "renamed"))
    _before_the_second_save(monkeypatch, gone_now)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: run_pretrain(data, out, *RUN))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot write checkpoint {out / 'checkpoint-1.pth'}: --output_dir {out} was removed or moved while "
        "this run wrote to it, and the checkpoints it held with it: restore it and continue with --resume auto, or "
        "start again"
    ]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_output_dir_made_read_only_under_the_run_is_not_called_full(data, tmp_path, monkeypatch, capsys, code):
    """A scratch file system remounted read-only (or the folder's permissions taken) under the run: the line said
    'Read-only file system (it needs about 71 MiB, 329 MiB are free there) ... free space', advice that cannot help."""
    out = tmp_path / "out"

    def refuse():
        raise OSError(code, os.strerror(code))

    _before_the_second_save(
        monkeypatch,
        lambda: monkeypatch.setattr(atomic, "open", budgeted_open(0, refuse, lambda p, m: ".pth" in p), raising=False),
    )
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: run_pretrain(data, out, *RUN))
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: cannot write checkpoint {out / 'checkpoint-1.pth'}: {os.strerror(code)}: --output_dir {out} no longer "
        "takes files; the earlier checkpoints are intact: make it writable again (or copy them to another "
        "--output_dir) and continue with --resume auto"
    ]
    assert load(out / "checkpoint-0.pth")["epoch"] == 0


def test_full_disk_during_log_txt_is_one_line(tmp_path, monkeypatch):
    run_log = RunLog("", str(tmp_path), [])
    _full_disk(monkeypatch, atomic, after_bytes=0, only="log.txt")
    with pytest.raises(UserError, match=rf"cannot write {tmp_path / 'log.txt'}: No space left on device; "):
        run_log.epoch({"epoch": 0, "train_loss": 1.0})


# ---------------------------------------------------------------------------------------------
# 6. log.txt agrees with the checkpoint a run continues from
def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_log_txt_is_rewritten_from_the_history(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epoch": 1}\n')  # an earlier run's, or one drifted
    RunLog("", str(tmp_path), [])  # a fresh start replaces it
    assert log.read_text() == ""
    history = [{"epoch": 0, "train_loss": 0.5}]
    run_log = RunLog("", str(tmp_path), history)  # a resume: the checkpoint's lines
    assert _lines(log) == history
    run_log.record({"epoch": 1, "train_loss": 0.25})  # into the history first (the checkpoint's) ...
    assert _lines(log) == history[:1] and len(history) == 2
    run_log.write()  # ... then into log.txt
    assert _lines(log) == history
    assert not list(tmp_path.glob("*.tmp*"))
    # A checkpoint older than the history: log.txt is kept and appended to.
    legacy = RunLog("", str(tmp_path), None)
    legacy.epoch({"epoch": 2})
    assert [line["epoch"] for line in _lines(log)] == [0, 1, 2]


def test_meter_sums_round_trip_to_the_same_average():
    whole, first, second = logger.MetricLogger(), logger.MetricLogger(), logger.MetricLogger()
    values = [0.1, 0.7, 1e-3, 3.3, 0.2]
    for v in values:
        whole.update(loss=v)
    for v in values[:2]:
        first.update(loss=v)
    (saved,) = json.loads(json.dumps(first.sums_of_every_rank("cpu")))  # one process: one rank's sums
    second.load_sums(saved)
    for v in values[2:]:
        second.update(loss=v)
    assert second.averages_over_ranks("cpu") == whole.averages_over_ranks("cpu") == {"loss": sum(values) / len(values)}


def test_log_txt_never_holds_an_epoch_whose_checkpoint_was_not_written(data, tmp_path, monkeypatch):
    """An epoch's line reaches log.txt after its checkpoint (Checkpointer.end_epoch): where that save fails (here
    a full disk), log.txt ends with the epoch the earlier checkpoint holds, which a resume continues from. Written
    before the save, it held a line of an epoch the run then trains again."""
    out = tmp_path / "out"
    _before_the_second_save(monkeypatch, lambda: _full_disk(monkeypatch, atomic, only=".pth"))
    with pytest.raises(SystemExit):
        run_cli(lambda: run_pretrain(data, out, *RUN))
    assert checkpoint_names(out) == {"checkpoint-0.pth"}
    assert [json.loads(line)["epoch"] for line in (out / "log.txt").read_text().splitlines()] == [0]


def test_a_stop_that_comes_during_an_epochs_save_names_that_checkpoint(data, tmp_path, monkeypatch, capsys):
    """A signal after an epoch's last check point (during its save) stops the run at the epoch's end
    (Checkpointer.stop_if_requested), and the one line names the checkpoint just written, the one to continue from."""
    import signal

    out = tmp_path / "out"
    real_end_epoch = Checkpointer.end_epoch

    def end_epoch_signalled(self, epoch, line=None):
        os.kill(os.getpid(), signal.SIGUSR1)
        real_end_epoch(self, epoch, line)

    monkeypatch.setattr(Checkpointer, "end_epoch", end_epoch_signalled)
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: run_pretrain(data, out, *RUN))
    assert stop.value.code == 128 + signal.SIGUSR1
    assert f"stopped on request after writing {out / 'checkpoint-0.pth'}" in capsys.readouterr().err
    assert checkpoint_names(out) == {"checkpoint-0.pth"}
