"""The order in which an epoch draws its samples, without holding it: a seeded bijection of [0, n).

`EpochOrder(seed, epoch, n)[positions]` is the sample id drawn at each position of the epoch. It is
a Feistel network over the smallest domain of 4^k >= n elements (two halves of k bits), walked
along its cycle until the value lands in [0, n) ("cycle walking": the restriction of a permutation
of a larger domain to [0, n) is a permutation of [0, n), and the walk takes fewer than 4 steps on
average since the domain is under 4n). It costs nothing per sample: where a materialised
permutation takes 8 bytes per sample in every process and loader worker, this holds 6 round keys.

Its round keys come from (seed, epoch) alone, so every rank and worker computes the same order, and
each epoch gets its own. Six rounds (four make a Feistel network a strong pseudo-random permutation;
two more for margin) of a 64-bit mixing function (splitmix64's finaliser) shuffle as well as a
uniform permutation by the measures of tests/test_order.py and docs/streaming.md (distinct source
images per batch, rank correlation of position and id, agreement between epochs).
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 6


class EpochOrder:
    def __init__(self, seed: int, epoch: int, size: int):
        if size < 1:
            raise ValueError(f"an epoch order needs at least one sample, got {size}")
        self.size = size
        self.half_bits = max(1, ((size - 1).bit_length() + 1) // 2)
        self.mask = np.uint64((1 << self.half_bits) - 1)
        self.keys = np.random.default_rng([seed, epoch]).integers(0, 2**64, _ROUNDS, dtype=np.uint64)

    def __getitem__(self, positions) -> np.ndarray:
        """The sample ids at `positions` (ints in [0, size)); an array of the positions' shape."""
        values = np.array(positions, dtype=np.uint64, ndmin=1)
        if values.size and int(values.max()) >= self.size:
            raise IndexError(f"position {int(values.max())} is outside an epoch of {self.size} samples")
        pending = np.ones(values.shape, dtype=bool)
        while pending.any():  # cycle walking: re-apply until inside [0, size); at most a few rounds
            moved = self._permute(values[pending])
            values[pending] = moved
            pending[pending] = moved >= self.size
        return values.astype(np.int64).reshape(np.shape(positions))

    def _permute(self, values: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = values >> shift, values & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right ^ key) & self.mask)
        return (left << shift) | right


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every output bit depends on every input bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))
