"""A linear classifier on frozen, cached features: the cheap form of linear probing.

The paper's probe (main_linprobe.py) runs the frozen encoder on augmented images every epoch: on
a CPU a forward pass per image per epoch. Here every image is embedded once (center crop) and a
linear layer is fitted to the cached features, as probes that precompute features do (CLIP's).
As in the paper's probe, the features are standardised first and no weight decay is used.
"""

import math

import torch
import torch.nn.functional as F

from util.memory import require


def linear_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.1,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Top-1 accuracy (%) on ``test_x`` of a linear layer trained on ``train_x`` with SGD
    (momentum 0.9, cosine learning rate, shuffled mini-batches drawn under ``seed``)."""
    features = train_x.shape[1]
    # The layer, its gradient and momentum; a batch's logits and their gradient; the test logits.
    values = 3 * (features + 1) * num_classes + (2 * batch_size + len(test_x)) * num_classes
    require(
        4 * values,
        f"the linear classifier of {features} features x {num_classes} classes",
        "the largest label sets the class count: number the classes 0, 1, 2, ... without gaps",
        train_x.device,
    )
    mean, std = train_x.mean(dim=0), train_x.std(dim=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    layer = torch.nn.Linear(train_x.shape[1], num_classes, device=train_x.device)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    optimizer = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total = epochs * steps_per_epoch
    with torch.enable_grad():  # callers may hold inference mode for the features
        for epoch in range(epochs):
            order = torch.randperm(len(train_x), generator=generator).to(train_x.device)
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                optimizer.param_groups[0]["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
                batch = order[i * batch_size : (i + 1) * batch_size]
                loss = F.cross_entropy(layer(train_x[batch]), train_y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    with torch.no_grad():
        return 100.0 * (layer(test_x).argmax(dim=1) == test_y).float().mean().item()
