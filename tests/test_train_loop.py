"""The shared training loop's update against hand-computed SGD steps: gradient accumulation,
clipping of the accumulated gradient, and the per-iteration learning rate."""

from argparse import Namespace

import pytest
import torch
from helpers import REPO  # noqa: F401  (puts the repository on sys.path)

from util.checkpoint.state import TrainState
from util.train.loop import train_one_epoch
from util.train.precision import LossScaler


def _run(batches: list[torch.Tensor], accum_iter: int, clip_grad: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False)
    start = model.weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    args = Namespace(
        device="cpu", precision="fp32", print_freq=100, accum_iter=accum_iter, ckpt_every_steps=0,
        lr=0.5, min_lr=0.5, warmup_epochs=0, epochs=1, output_dir="", clip_grad=clip_grad,
    )  # fmt: skip
    state = TrainState(model, optimizer, LossScaler("fp32"), args)
    train_one_epoch(model, batches, state, 0, lambda x: model(x).sum())
    return start, model.weight.detach()


def _by_hand(start: torch.Tensor, grads: list[torch.Tensor], clip_grad: float | None) -> torch.Tensor:
    g = torch.stack(grads).mean(0)  # the loop divides each micro-batch's loss by accum_iter
    if clip_grad is not None and g.norm() > clip_grad:
        g = g * clip_grad / g.norm()
    return start - 0.5 * g


@pytest.mark.parametrize("clip_grad", [None, 0.1, 1e3])
@pytest.mark.parametrize("accum_iter", [1, 2])
def test_update_equals_hand_computed_sgd(accum_iter, clip_grad):
    # d/dw of sum(w . x) over a batch is the sum of the batch's rows.
    batches = [torch.tensor([[1.0, 2.0, -1.0]]), torch.tensor([[3.0, 0.0, 1.0], [1.0, 1.0, 1.0]])]
    start, trained = _run(batches, accum_iter, clip_grad)
    grads = [b.sum(0, keepdim=True) for b in batches]
    if accum_iter == 1:
        expected = _by_hand(_by_hand(start, grads[:1], clip_grad), grads[1:], clip_grad)
    else:
        expected = _by_hand(start, grads, clip_grad)
    torch.testing.assert_close(trained, expected, rtol=0, atol=1e-6)
    if clip_grad == 0.1:  # the clip actually bit: the step is shorter than the unclipped one
        _, unclipped = _run(batches, accum_iter, None)
        assert (trained - start).norm() < (unclipped - start).norm()
