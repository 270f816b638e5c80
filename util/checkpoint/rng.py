"""Every random-number generator a training step draws from, saved and restored for exact resume."""

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from util.train import distributed


def capture_rng() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],  # this rank's device
    }


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def gather_rng() -> list[dict[str, Any]]:
    """Every rank's RNG state, on every rank (so that rank 0 can save all of them)."""
    mine = capture_rng()
    if not distributed.is_dist():
        return [mine]
    states: list[Any] = [None] * distributed.world_size()
    dist.all_gather_object(states, mine)
    return states
