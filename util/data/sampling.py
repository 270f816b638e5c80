"""Deterministic sampling. Training data go through ``SeededSampler``/``SeededDataset``: every
sample's augmentation is drawn from a seed fixed by (run seed, epoch, index), so the data a run sees
do not depend on the number of workers, on worker restarts, or on where a resumed run picks up
inside an epoch. Evaluation shards with ``ShardSampler``, which repeats nothing."""

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler, get_worker_info

from util.cli.errors import fail
from util.data.splitmix import splitmix64
from util.train import distributed


class SeededSampler(Sampler):
    """Shuffles and shards like ``DistributedSampler`` and yields ``(index, sample_seed)`` pairs.
    ``set_epoch(epoch, skip)`` also skips the first ``skip`` samples of this rank's share: a run
    resumed inside an epoch continues with exactly the samples it had not seen."""

    def __init__(self, dataset_len: int, seed: int):
        self._inner = DistributedSampler(
            range(dataset_len), num_replicas=distributed.world_size(), rank=distributed.rank(), seed=seed
        )
        self.seed, self.epoch, self.skip = seed, 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self._inner.set_epoch(epoch)
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = np.fromiter(self._inner, dtype=np.int64, count=len(self._inner))[self.skip :]
        return _pairs(indices, sample_seeds(self.seed, self.epoch, indices))

    def __len__(self) -> int:
        return len(self._inner) - self.skip


# Pairs made into Python objects at a time: all of them at once held four lists of the shard's
# length beside DistributedSampler's own (14M images in one process: 1.25 GB where it holds 0.65).
PAIRS_PER_CHUNK = 1 << 16


def _pairs(indices: np.ndarray, seeds: np.ndarray) -> Iterator[tuple[int, int]]:
    """``(index, seed)`` as Python ints, made a chunk at a time."""
    for start in range(0, len(indices), PAIRS_PER_CHUNK):
        chunk = slice(start, start + PAIRS_PER_CHUNK)
        yield from zip(indices[chunk].tolist(), seeds[chunk].tolist(), strict=True)


def loader_generator(seed: int = 0) -> torch.Generator:
    """A DataLoader's own generator. Each pass over a loader draws its workers' base seed from it, or, without
    one, from the global torch stream that masks and drop path draw on: how often a run evaluated would then
    change its weights. None of our loaders needs the workers' seeds (SeededDataset seeds every sample)."""
    return torch.Generator().manual_seed(seed)


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """A 32-bit seed per sample: SplitMix64's finaliser of the index over a key for (seed, epoch).
    Vectorised: the sampler, in the main process, must keep up with every worker (benchmarks/README.md)."""
    key = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return (splitmix64(indices, key) >> np.uint64(32)).astype(np.uint32)


class SeededDataset(Dataset):
    """Wraps a dataset: item ``(index, seed)`` is ``dataset[index]`` drawn under ``seed``, with
    python's, numpy's and torch's CPU generators (augmentations use all three) seeded for the call.
    In a loader worker they belong to this dataset alone; in the main process (``--num_workers 0``)
    they are restored after the call, so the training loop's streams are untouched."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        if get_worker_info() is not None:
            _seed_cpu_generators(seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        torch_state = torch.default_generator.get_state()
        try:
            _seed_cpu_generators(seed)
            return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
            torch.default_generator.set_state(torch_state)


def _seed_cpu_generators(seed: int) -> None:
    # Not torch.manual_seed: that also queues a seed for every accelerator, recording a stack
    # trace each time (costlier than decoding a small image), and with CUDA initialised in this
    # process it would reseed the GPU's generator, which draws the masks.
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)


def evenly_spaced(count: int, total: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)``, the first and last included."""
    return np.unique(np.linspace(0, total - 1, count).round().astype(np.int64)).tolist()


class ShardSampler(Sampler):
    """Rank r takes items r, r + world, r + 2*world, ...: every item exactly once over all ranks,
    with no padding duplicates (for evaluation)."""

    def __init__(self, dataset_len: int):
        self.indices = list(range(distributed.rank(), dataset_len, distributed.world_size()))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def require_a_share_each(count: int, subject: str, advice: str) -> None:
    """Refuse, in one line (``subject`` and its ``count`` of items "cannot be shared by N processes; ``advice``"),
    to shard fewer items than processes with ``ShardSampler``: a rank with none skips the collectives the others
    wait in (a k-NN feature gather; DDP's buffer broadcast in an evaluation's first forward pass), and gloo
    aborts on the mismatch, NCCL waits for its watchdog or mixes data."""
    if count < distributed.world_size():
        fail(f"{subject} cannot be shared by {distributed.world_size()} processes; {advice}")
