"""LARS (You et al., 2017): SGD with momentum whose step for each weight matrix is scaled by
trust * ||w|| / ||g + wd * w||. Used for linear probing with large batches, as in MAE.
Biases and normalisation parameters (1-D) take plain momentum SGD steps without weight decay."""

from collections.abc import Iterable

import torch


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 0.0,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
    ):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - the Optimizer interface
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim > 1:
                    update = update.add(p, alpha=group["weight_decay"])
                    w_norm, u_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(update)
                    ratio = group["trust_coefficient"] * w_norm / u_norm
                    # Where either norm is zero the ratio is undefined: take a plain step.
                    trust = torch.where((w_norm > 0) & (u_norm > 0), ratio, torch.ones_like(ratio))
                    update = update.mul(trust)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                state["mu"].mul_(group["momentum"]).add_(update)
                p.add_(state["mu"], alpha=-group["lr"])
        return loss
