"""Guards added after review: official-code compatibility of our checkpoints, the end-of-epoch
finiteness check, mid-epoch resume with other batch settings, pruning around the file
just written, and run times past 24 hours."""

import argparse
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import checkpoint_names, make_dataset, run_pretrain  # noqa: E402

import main_pretrain  # noqa: E402
import models_vit  # noqa: E402
from util.checkpoint import resume as resuming  # noqa: E402
from util.checkpoint import state as checkpoint  # noqa: E402
from util.cli.errors import (
    NonFiniteLoss,  # noqa: E402
    UserError,  # noqa: E402
)
from util.train.precision import LossScaler  # noqa: E402


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_scaler_state_loads_into_an_enabled_grad_scaler(precision):
    """The official code restores an enabled GradScaler from ckpt['scaler'], which refuses {}."""
    with pytest.raises(RuntimeError):
        torch.amp.GradScaler("cpu").load_state_dict({})
    state = LossScaler(precision).state_dict()
    scaler = torch.amp.GradScaler("cpu")
    scaler.load_state_dict(state)
    assert scaler.get_scale() == 65536.0


def test_classifier_parameter_order_is_the_official_one():
    """fc_norm after head, as the official classifier registers it: optimizer states then
    line up with the official fine-tuning checkpoints' parameter groups."""
    names = list(models_vit.vit_tiny_patch16(global_pool=True).state_dict())
    assert names[-4:] == ["head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"]


def test_nan_after_the_last_check_point_stops_before_the_checkpoint(tmp_path, monkeypatch):
    """3 iterations, --accum_iter 2: the last iteration is not an optimizer step, so no check point
    falls on it; its NaN loss must still stop the run before checkpoint-0 is written."""
    data = make_dataset(tmp_path / "data", 16)  # 48 images, batch 16: 3 iterations
    build = main_pretrain.build_model
    calls = [0]

    def build_poisoned(*given):
        model = build(*given)
        forward_loss = model.forward_loss

        def poisoned(*a, **k):
            calls[0] += 1
            loss = forward_loss(*a, **k)
            return loss * float("nan") if calls[0] == 3 else loss

        model.forward_loss = poisoned
        return model

    monkeypatch.setattr(main_pretrain, "build_model", build_poisoned)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteLoss, match="epoch 0, iteration 2"):
        run_pretrain(data, out, "--epochs", "2", "--accum_iter", "2", "--print_freq", "2", "--vis_freq", "0")
    assert checkpoint_names(out) == set()


def _state(tmp_path, **flags):
    model = torch.nn.Linear(2, 2)
    args = argparse.Namespace(
        output_dir=str(tmp_path),
        resume="",
        start_epoch=0,
        epochs=5,
        save_freq=20,
        keep_last=1,
        batch_size=8,
        world_size=1,
        accum_iter=1,
        device="cpu",
        **flags,
    )
    return checkpoint.TrainState(model, torch.optim.SGD(model.parameters(), lr=0.1), LossScaler("fp32"), args)


def test_mid_epoch_resume_with_another_batch_size_is_refused(tmp_path):
    path = checkpoint.save_checkpoint(_state(tmp_path), epoch=1, step=3)
    resumed = _state(tmp_path)
    resumed.args.resume, resumed.args.batch_size = path, 16
    with pytest.raises(UserError, match="--batch_size 8, this run has 16"):
        resuming.resume(resumed, resuming.open_resume(resumed.args))
    resumed.args.batch_size = 8
    assert resuming.resume(resumed, resuming.open_resume(resumed.args)) == checkpoint.Position(1, 3)


def test_pruning_never_removes_the_checkpoint_just_written(tmp_path):
    """A run resumed from an older checkpoint in a folder that holds later ones: its new
    checkpoints stay (and the later ones are left alone)."""
    state = _state(tmp_path)
    stale = checkpoint.save_checkpoint(state, epoch=3)
    written = checkpoint.save_checkpoint(state, epoch=1)
    assert os.path.exists(written) and os.path.exists(stale)
    mid = checkpoint.save_checkpoint(state, epoch=2, step=1)
    assert os.path.exists(mid)


def test_interrupt_uninstall_forgets_the_request_and_puts_the_handler_before_ours_back(capsys):
    """What lets one process run trainings one after another (the tests do): after a signal, the
    next run must not stop at its first check point, and the handler before ours is back."""
    import signal

    from helpers import preserved_signals

    from util.train import interrupt

    handed = []

    def before(*a):
        handed.append(a)

    with preserved_signals():
        signal.signal(signal.SIGUSR1, before)
        interrupt.install()
        signal.raise_signal(signal.SIGUSR1)
        assert interrupt.requested() and "received SIGUSR1" in capsys.readouterr().err and handed == []
        interrupt.uninstall()
        assert not interrupt.requested()
        assert signal.getsignal(signal.SIGUSR1) is before
        interrupt.hand_over()  # nothing requested any more: nothing handed over
        assert handed == []


def test_a_stop_asked_for_while_the_run_starts_stops_before_training(tmp_path, capsys):
    """SIGTERM during start-up (a long checkpoint load, say): no promise of a checkpoint that never
    comes, no training step; one line saying nothing new was saved."""
    import signal

    from helpers import isolated_interrupts, make_dataset, run_pretrain

    from util.train import checkpointer, interrupt
    from util.train.checkpointer import Checkpointer

    data, out = make_dataset(tmp_path / "data", 6), tmp_path / "out"

    class Signalled(Checkpointer):  # the signal arrives once the run has built everything
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            signal.raise_signal(signal.SIGTERM)

    with isolated_interrupts(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(checkpointer, "Checkpointer", Signalled)  # made by checkpointer.training
        with pytest.raises(interrupt.Interrupted, match=f"before training began; nothing new in {out} to save"):
            run_pretrain(data, out, "--epochs", "1")
    assert "Epoch: [" not in capsys.readouterr().out and not list(out.glob("checkpoint-*"))


def test_a_finished_run_gives_the_process_its_signal_handlers_back(tmp_path):
    """In a notebook, Ctrl-C after a run must interrupt again, not ask a finished run to checkpoint."""
    import signal

    from helpers import isolated_interrupts, make_dataset, run_pretrain

    with isolated_interrupts():
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        run_pretrain(make_dataset(tmp_path / "data", 6), tmp_path / "out", "--epochs", "1", "--vis_freq", "0")
        assert {s: signal.getsignal(s) for s in before} == before


def test_a_run_started_after_a_stopped_one_in_the_same_process_starts_unstopped(capsys):
    """A run stopped on request keeps our handlers and its request (``finish`` runs for a finished run only); the
    next run in the process (a notebook) installs them again: it must neither stop at its first check point nor
    take our own handler for the one before ours, which ``uninstall`` would then put back instead of the user's."""
    import signal

    from helpers import preserved_signals

    from util.train import interrupt

    def before(*a):
        pass

    with preserved_signals():
        signal.signal(signal.SIGUSR1, before)
        interrupt.install()
        signal.raise_signal(signal.SIGUSR1)  # the first run stops on it, and ends without uninstall
        interrupt.install()  # the next run
        assert not interrupt.requested()
        interrupt.uninstall()
        assert signal.getsignal(signal.SIGUSR1) is before


def test_hand_over_passes_on_the_preemption_signals_received_only():
    """submitit's SIGUSR2 handler requeues the job, its SIGTERM handler does not: a job that received one of them
    hands over that one alone, not every handler installed before ours."""
    import signal

    from helpers import preserved_signals

    from util.train import interrupt

    handed = []
    with preserved_signals():
        for s in interrupt.PREEMPTION_SIGNALS:
            signal.signal(s, lambda signum, frame: handed.append(signum))
        interrupt.install()
        signal.raise_signal(signal.SIGUSR2)
        interrupt.hand_over()
        assert handed == [signal.SIGUSR2]
        interrupt.uninstall()


def test_a_stop_learns_the_preemption_signals_other_ranks_received(monkeypatch):
    """The stop's check point tells every rank which preemption signals any rank received (interrupt.agree), so
    that rank 0, which alone requeues a submitit job, hands over a SIGUSR2 only another node received."""
    import signal

    from helpers import isolated_interrupts

    from util.train import checkpointer, interrupt

    def summed_with_another_rank(values, device):  # this rank: nothing; another: a stop and its SIGUSR2
        return [
            v + (1.0 if i == 0 or interrupt.PREEMPTION_SIGNALS[i - 1] == signal.SIGUSR2 else 0.0)
            for i, v in enumerate(values)
        ]

    with isolated_interrupts():
        interrupt.install()
        monkeypatch.setattr(checkpointer.distributed, "all_reduce_sum", summed_with_another_rank)
        assert checkpointer.stop_requested("cpu")
        assert interrupt.received() == {signal.SIGUSR2}
