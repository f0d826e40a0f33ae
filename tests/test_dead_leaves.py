"""Dead-leaves images: seeded, fully covered by palette colours, occluding disks at many scales."""

import numpy as np
import pytest

from data_shards.dead_leaves import dead_leaves

BLACK_WHITE = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)


def test_seeded_and_covered_by_the_palette():
    image = dead_leaves(96, np.random.default_rng(3), BLACK_WHITE, supersample=1)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    again = dead_leaves(96, np.random.default_rng(3), BLACK_WHITE, supersample=1)
    other = dead_leaves(96, np.random.default_rng(4), BLACK_WHITE, supersample=1)
    assert (image == again).all() and (image != other).any()
    # Without supersampling every pixel is one leaf's colour: no bare (unpainted) pixels.
    assert set(np.unique(image)) == {0, 255} and (image == image[..., :1]).all()


def test_supersampling_antialiases_edges_only():
    image = dead_leaves(96, np.random.default_rng(0), BLACK_WHITE)[..., 0]
    blended = (image > 0) & (image < 255)
    assert 0.01 < blended.mean() < 0.5  # edge pixels are mixed, leaf interiors stay pure


def test_leaves_come_in_many_sizes():
    # Flat runs along rows: long ones from big leaves, short ones from the clutter of small ones.
    image = dead_leaves(128, np.random.default_rng(1), np.random.default_rng(1).integers(0, 256, (64, 3)),
                        supersample=1)[..., 0]
    changes = np.flatnonzero(np.diff(image, axis=1).ravel() != 0)
    runs = np.diff(changes)
    assert (runs <= 2).mean() > 0.1 and runs.max() >= 30


@pytest.mark.parametrize("palette", [np.zeros((0, 3)), np.zeros((4, 4)), np.zeros(3)])
def test_a_bad_palette_is_refused(palette):
    with pytest.raises(ValueError, match="palette must be"):
        dead_leaves(16, np.random.default_rng(0), palette)
