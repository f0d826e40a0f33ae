"""Dead-leaves images: seeded, fully covered by palette colours, occluding disks at many scales, thin bars."""

import numpy as np
import pytest

from data_shards.dead_leaves import dead_leaves

BLACK_WHITE = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)


@pytest.mark.parametrize("bar_fraction", [0.0, 0.3])
def test_seeded_and_covered_by_the_palette(bar_fraction):
    def draw(seed):
        return dead_leaves(96, np.random.default_rng(seed), BLACK_WHITE, bar_fraction=bar_fraction, supersample=1)

    image, again, other = draw(3), draw(3), draw(4)
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
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


def _solid_share(image: np.ndarray, side: int = 5) -> float:
    """Share of pixels whose side x side neighbourhood is one colour (inside a leaf at least that wide)."""
    rgb = image.astype(np.int64) @ np.array([1, 256, 65536])
    windows = np.lib.stride_tricks.sliding_window_view(rgb, (side, side))
    return float((windows == windows[..., :1, :1]).all(axis=(-1, -2)).mean())


def test_bars_are_thin_lines():
    # Many colours, so neighbouring leaves differ; disks of radius >= 6 are wider than any bar (<= 5 px).
    palette = np.random.default_rng(2).integers(0, 256, (4096, 3))
    disks = dead_leaves(128, np.random.default_rng(5), palette, min_radius=6, supersample=1)
    bars = dead_leaves(128, np.random.default_rng(5), palette, min_radius=6, bar_fraction=1.0, supersample=1)
    assert _solid_share(disks) > 0.25
    assert _solid_share(bars) < 0.05


@pytest.mark.parametrize("palette", [np.zeros((0, 3)), np.zeros((4, 4)), np.zeros(3)])
def test_a_bad_palette_is_refused(palette):
    with pytest.raises(ValueError, match="palette must be"):
        dead_leaves(16, np.random.default_rng(0), palette)


def test_a_bad_bar_fraction_is_refused():
    with pytest.raises(ValueError, match="bar_fraction"):
        dead_leaves(16, np.random.default_rng(0), BLACK_WHITE, bar_fraction=1.5)
