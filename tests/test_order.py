"""The epoch order: a seeded bijection of [0, n), computed per position, shuffling like a uniform permutation."""

import numpy as np
import pytest

from data_shards.order import EpochOrder


@pytest.mark.parametrize("size", [1, 2, 3, 5, 23, 255, 256, 257, 1000, 4097])
def test_every_size_gets_a_permutation(size):
    order = EpochOrder(7, 3, size)[np.arange(size)]
    assert sorted(order.tolist()) == list(range(size))


def test_the_order_is_seeded_and_new_each_epoch():
    positions = np.arange(1000)
    first = EpochOrder(0, 0, 1000)[positions]
    assert np.array_equal(first, EpochOrder(0, 0, 1000)[positions])  # every rank and worker agrees
    assert [int(EpochOrder(0, 0, 1000)[p]) for p in (0, 500, 999)] == first[[0, 500, 999]].tolist()
    for other in (EpochOrder(0, 1, 1000), EpochOrder(1, 0, 1000)):
        assert np.mean(other[positions] == first) < 0.02  # unrelated: about 1/1000 agree by chance
    with pytest.raises(IndexError, match="outside an epoch of 1000"):
        EpochOrder(0, 0, 1000)[1000]


def test_it_shuffles_like_a_uniform_permutation():
    """1440 samples, 24 consecutive ones from each image (worse than a pack, which spreads them): batches
    of 8 hold as many distinct images as a uniform permutation's, and position says nothing of the id."""
    size, positions = 1440, np.arange(1440)

    def distinct(order):
        images = order // 24
        return np.mean([len(set(images[i:i + 8].tolist())) for i in range(0, size, 8)])

    ours = [distinct(EpochOrder(seed, 0, size)[positions]) for seed in range(10)]
    uniform = [distinct(np.random.default_rng(seed).permutation(size)) for seed in range(10)]
    assert np.mean(ours) >= np.mean(uniform) - 0.05  # both about 8 * (1 - 7/(2 * 1439) * 23) ~ 7.55
    correlation = [abs(np.corrcoef(positions, EpochOrder(seed, 0, size)[positions])[0, 1]) for seed in range(10)]
    assert np.mean(correlation) < 0.05


def test_it_holds_nothing_per_sample():
    order = EpochOrder(0, 0, 10**12)  # a permutation of 10^12 ids would take 8 TB
    ids = order[np.arange(10**12 - 1000, 10**12)]
    assert len(set(ids.tolist())) == 1000 and ids.min() >= 0 and ids.max() < 10**12
