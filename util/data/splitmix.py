"""SplitMix64 over a counter, vectorised: random numbers that do not depend on the order in which
they are drawn (each sample's seed, each sample's crop), as a loader with workers or ranks needs."""

import numpy as np


def splitmix64(counter: np.ndarray, key: int | np.uint64) -> np.ndarray:
    """SplitMix64's 64-bit output (uint64) for each value of ``counter`` in the stream ``key``: the
    golden-ratio increment, then its finaliser."""
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        z = counter.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(key)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
