"""One epoch of the classification engine (engine_finetune.train_one_epoch) against hand-computed
SGD steps: gradient accumulation (with an epoch that is not a multiple of it), clipping of the
accumulated gradient, and the refusal of an accumulation longer than the epoch; the epoch's last line."""

from argparse import Namespace

import pytest
import torch
from helpers import REPO  # noqa: F401  (puts the repository on sys.path)

import engine_pretrain
from engine_finetune import train_one_epoch
from util.checkpoint.state import Position, TrainState
from util.cli.errors import UserError
from util.lr_sched import lr_at
from util.train.checkpointer import Checkpointer, training
from util.train.precision import LossScaler
from util.train.progress import RunLog


class _Reconstruction(torch.nn.Module):
    """What engine_pretrain calls an MAE with, ``model(imgs, mask_ratio=...)`` -> (loss, pred, mask), with the
    classification tests' loss: the sum of w . x over the batch."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1, bias=False)

    def forward(self, imgs: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, None, None]:
        return self.linear(imgs).sum(), None, None


def _train(
    batches: list[torch.Tensor], accum_iter: int, clip_grad: float | None, pretrain: bool = False, **schedule: float
) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """One epoch (0) of SGD by the classification engine, or with ``pretrain`` by the pre-training one, at a
    constant lr of 0.5 unless ``schedule`` says otherwise: the start and trained weights, and the lr of each step."""
    torch.manual_seed(0)
    model = _Reconstruction() if pretrain else torch.nn.Linear(3, 1, bias=False)
    weight = model.linear.weight if pretrain else model.weight
    start = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    lrs = []
    optimizer.register_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    args = Namespace(
        device="cpu", precision="fp32", print_freq=100, accum_iter=accum_iter, ckpt_every_steps=0, batch_size=2,
        lr=0.5, min_lr=0.5, warmup_epochs=0, epochs=1, output_dir="", clip_grad=clip_grad,
        mean=(0.0,), std=(1.0,), mask_ratio=0.75,
    )  # fmt: skip
    vars(args).update(schedule)
    state = TrainState(model, optimizer, LossScaler("fp32"), args)
    loader = [(b, torch.zeros(len(b))) for b in batches]
    checkpointer = Checkpointer(state, RunLog("", ""))
    if pretrain:
        engine_pretrain.train_one_epoch(model, loader, state, 0, checkpointer)
    else:
        train_one_epoch(model, loader, state, 0, checkpointer, lambda out, _: out.sum())
    return start, weight.detach(), lrs


def _run(batches: list[torch.Tensor], accum_iter: int, clip_grad: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    start, trained, _ = _train(batches, accum_iter, clip_grad)
    return start, trained


def _by_hand(start: torch.Tensor, grads: list[torch.Tensor], clip_grad: float | None) -> torch.Tensor:
    g = torch.stack(grads).mean(0)  # each micro-batch's loss is divided by its group's size
    if clip_grad is not None and g.norm() > clip_grad:
        g = g * clip_grad / g.norm()
    return start - 0.5 * g


# d/dw of sum(w . x) over a batch is the sum of the batch's rows.
BATCHES = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])]


@pytest.mark.parametrize("pretrain", [False, True])
@pytest.mark.parametrize("clip_grad", [None, 0.1, 1e3])
@pytest.mark.parametrize("accum_iter", [1, 2])
def test_update_equals_hand_computed_sgd(accum_iter, clip_grad, pretrain):
    """Either engine's step: each micro-batch's loss divided by --accum_iter, one step per group, the accumulated
    gradient clipped."""
    start, trained, _ = _train(BATCHES, accum_iter, clip_grad, pretrain=pretrain)
    grads = [b.sum(0, keepdim=True) for b in BATCHES]
    if accum_iter == 1:
        expected = _by_hand(_by_hand(start, grads[:1], clip_grad), grads[1:], clip_grad)
    else:
        expected = _by_hand(start, grads, clip_grad)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    if clip_grad == 0.1:  # the clip actually bit: the step is shorter than the unclipped one
        _, unclipped, _ = _train(BATCHES, accum_iter, None, pretrain=pretrain)
        assert (trained - start).norm() < (unclipped - start).norm()


@pytest.mark.parametrize("pretrain", [False, True])
@pytest.mark.parametrize("accum_iter", [1, 2])
def test_the_lr_of_each_step_is_the_schedules_at_its_fractional_epoch(accum_iter, pretrain):
    """The lr is set at the first micro-batch of each optimizer step, from the schedule at the fractional epoch
    (iteration / iterations of the epoch), as the official engines do: 8 iterations of a 2-epoch warm-up."""
    schedule = dict(lr=1.0, min_lr=0.0, warmup_epochs=2, epochs=4)
    _, _, lrs = _train([BATCHES[0]] * 8, accum_iter, None, pretrain, **schedule)
    want = [lr_at(step / 8, Namespace(**schedule)) for step in range(0, 8, accum_iter)]
    assert lrs == pytest.approx(want, rel=0, abs=1e-12)
    assert len(set(lrs)) == len(lrs)  # each step its own lr: a per-epoch lr would repeat one


def test_last_shorter_accumulation_group_steps_with_its_mean_gradient():
    """3 iterations with --accum_iter 2: a step on the mean of the first two gradients, then one on
    the third alone; before, the third gradient was computed and thrown away."""
    batches = [*BATCHES, torch.tensor([[0.0, -2.0, 5.0]])]
    start, trained = _run(batches, 2, None)
    grads = [b.sum(0, keepdim=True) for b in batches]
    expected = _by_hand(_by_hand(start, grads[:2], None), grads[2:], None)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)


def test_accumulation_longer_than_the_epoch_is_refused_before_the_run_writes_anything(tmp_path):
    """Refused as the epoch loop starts, before log.txt and TensorBoard are made: it was refused at the first
    epoch, after an empty log.txt and an event file had replaced what the folder held."""
    args = Namespace(device="cpu", accum_iter=3, epochs=1, output_dir=str(tmp_path), log_dir=str(tmp_path))
    state = TrainState(torch.nn.Linear(3, 1), None, LossScaler("fp32"), args)
    with pytest.raises(UserError, match=r"--accum_iter 3 is more than the 2 iterations of an epoch"):
        with training(state, Position(0), iterations=len(BATCHES)):
            pass
    assert list(tmp_path.iterdir()) == []


def test_the_first_iteration_prints_a_line_with_its_loss(capsys):
    """A slow first step must not look like a hang: its line (loss, time, ETA) comes at once,
    although --print_freq asks for a line every 100 iterations."""
    _run([*BATCHES, *BATCHES], 1, None)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch: [0] [")]
    assert [line.split("]")[1] for line in lines] == [" [1/4", " [4/4"]
    torch.manual_seed(0)  # the weights _run starts from: the first loss is w . x of the first batch
    first = float(torch.nn.Linear(3, 1, bias=False).weight.detach() @ BATCHES[0][0])
    assert "eta: " in lines[0] and f"loss: {first:.4f} ({first:.4f})" in lines[0]


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (6, "0:01:15 (0.5000 s / it, 128.0 img/s); 3 more epochs of training at this pace: about 0:10:00"),
        (8, "0:01:15 (0.5000 s / it, 128.0 img/s); 1 more epoch of training at this pace: about 0:03:20"),
        (9, "0:01:15 (0.5000 s / it, 128.0 img/s)"),  # the last epoch
    ],
)
def test_an_epochs_last_line_gives_images_per_second_and_the_training_left(epoch, expected):
    """150 of an epoch's 400 iterations (a resumed epoch) in 75 s, 64 images each, of 10 epochs: the pace of
    those 150, and the epochs after this one, whole, at that pace (0.5 s x 400 = 200 s each)."""
    args = Namespace(device="cpu", accum_iter=1, batch_size=64, epochs=10)
    state = TrainState(torch.nn.Linear(1, 1), None, LossScaler("fp32"), args)
    progress = Checkpointer(state, RunLog("", "")).epoch(epoch, start_step=250, iterations=150)
    assert progress._pace(75.0, 150) == expected


def test_the_time_left_leaves_out_the_slow_first_iteration(monkeypatch, capsys):
    """A first iteration of 20 s (compiling, warming up, the loader's first batches), then 1 s each: the estimates
    of the epoch's rest and of the epochs after it go at 1 s an iteration. With the first counted in, the second
    line said 0:00:31 left (10.5 s an iteration) and the epoch's end 0:00:48 for the 2 more epochs."""
    import util.train.checkpointer as checkpointer

    clock = [0.0]
    monkeypatch.setattr(checkpointer, "time", Namespace(time=lambda: clock[0]))
    args = Namespace(device="cpu", accum_iter=1, batch_size=4, epochs=3, print_freq=2)
    state = TrainState(torch.nn.Linear(1, 1), None, LossScaler("fp32"), args)
    progress = Checkpointer(state, RunLog("", "")).epoch(0, start_step=0, iterations=5)
    for step, _ in progress.iterate(range(5)):
        clock[0] += 20.0 if step == 0 else 1.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Epoch: [0]")]
    etas = [line.split("eta: ")[1].split()[0] for line in lines if "eta: " in line]
    assert etas == ["0:01:20", "0:00:03", "0:00:01", "0:00:00"]  # after steps 0 (no other pace yet), 1, 3 and 4
    assert lines[-1].endswith(
        "0:00:24 (4.8000 s / it, 0.8 img/s); 2 more epochs of training at this pace: about 0:00:10"
    )
