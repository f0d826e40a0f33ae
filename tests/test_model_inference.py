"""Whole-image inference: padding to the network stride and tiled inference with blended seams."""
from __future__ import annotations

import pytest
import torch

from model import Restormer, pad_to_multiple, restore_image
from model_vectors import TINY, perturbed


pytestmark = pytest.mark.usefixtures("one_thread")


def test_pad_to_multiple_reflects_and_reports_size():
    x = torch.arange(2 * 3 * 13 * 9, dtype=torch.float32).reshape(2, 3, 13, 9)
    padded, size = pad_to_multiple(x)
    assert size == (13, 9) and padded.shape == (2, 3, 16, 16)
    assert torch.equal(padded[..., :13, :9], x)
    assert torch.equal(padded[..., 13, :9], x[..., 11, :])  # reflection, not replication
    same, _ = pad_to_multiple(torch.zeros(1, 1, 16, 8))
    assert same.shape == (1, 1, 16, 8)
    tiny, _ = pad_to_multiple(torch.rand(1, 3, 3, 2))  # too small to reflect: replicated
    assert tiny.shape == (1, 3, 8, 8)


def test_restore_image_crops_back_and_equals_model_on_padded_input():
    model = perturbed(Restormer(**TINY)).eval()
    x = torch.rand(1, 3, 21, 30)
    out = restore_image(model, x)
    with torch.no_grad():
        expected = model(pad_to_multiple(x)[0])[..., :21, :30]
    assert out.shape == x.shape and torch.equal(out, expected)
    assert torch.equal(restore_image(model, x, tile=64), out)  # one tile covers it: the same call


def test_tiling_places_and_normalises_blends_exactly():
    """With the output conv zeroed, Restormer is the identity (global residual): any misplaced
    tile or weights that do not sum to one would show up as a difference from the input."""
    model = Restormer(**TINY).eval()
    torch.nn.init.zeros_(model.output.weight)
    x = torch.rand(2, 3, 70, 101)
    out = restore_image(model, x, tile=32, overlap=16)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-6)


def test_tiling_is_exact_for_a_model_with_a_local_receptive_field():
    """Without transformer blocks Restormer is a conv net seeing < 48 px around a pixel: a tile
    pixel that far from a seam equals the untiled one, and blending only uses those (the outer
    quarter of each overlap is discarded), so tiling must reproduce the untiled output."""
    model = perturbed(Restormer(dim=8, num_blocks=[0, 0, 0, 0], num_refinement_blocks=0)).eval()
    x = torch.rand(1, 3, 200, 264)
    full = restore_image(model, x)
    tiled = restore_image(model, x, tile=256, overlap=192)
    assert (tiled - full).abs().max().item() < 1e-5


def test_tiling_stays_close_with_global_attention():
    """MDTA attends over the whole crop, so tiles see other statistics: close, not equal. The tiled
    error must stay far below the size of what the network adds to its input."""
    model = perturbed(Restormer(**TINY), seed=4).eval()
    x = torch.rand(1, 3, 96, 96)
    full = restore_image(model, x)
    tiled = restore_image(model, x, tile=64, overlap=32)
    assert (tiled - full).abs().mean() < 0.1 * (full - x).std()


def test_tile_arguments_are_checked():
    model = Restormer(**TINY).eval()
    with pytest.raises(ValueError, match=r"the tile \(30\) must be a positive multiple of 8"):
        restore_image(model, torch.rand(1, 3, 64, 64), tile=30)
    with pytest.raises(ValueError, match=r"smaller than the tile \(32\)"):
        restore_image(model, torch.rand(1, 3, 64, 64), tile=32, overlap=32)
