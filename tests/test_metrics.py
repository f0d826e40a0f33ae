"""PSNR/SSIM/Y against known values and scikit-image's reference SSIM."""

import math

import numpy as np
import pytest
import torch
from skimage.metrics import structural_similarity

from train.metrics import psnr, rgb_to_y, ssim


def _images(seed: int, shape=(2, 3, 40, 36)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(shape, generator=g)
    pred = (target + 0.1 * torch.randn(shape, generator=g)).clamp(0, 1)
    return pred, target


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    _, target = _images(0)
    assert torch.isinf(psnr(target, target)).all()
    assert torch.allclose(ssim(target, target), torch.ones(2, dtype=torch.float64))


def test_psnr_of_a_constant_offset_is_hand_computed():
    # float64 inputs: in float32, 0.6 - 0.5 is not 0.1 and the hand value would be off by 1e-6 dB.
    target = torch.full((1, 3, 8, 8), 0.5, dtype=torch.float64)
    pred = target + 0.1  # mse = 0.01 -> 10 * log10(1 / 0.01) = 20 dB
    assert psnr(pred, target).item() == pytest.approx(20.0, abs=1e-9)
    # An error on a quarter of the pixels: mse = 0.25 * 0.2^2 = 0.01 -> 20 dB again.
    pred = target.clone()
    pred[..., :4, :4] += 0.2
    assert psnr(pred, target).item() == pytest.approx(20.0, abs=1e-9)


def test_psnr_is_per_image():
    target = torch.full((2, 1, 4, 4), 0.5, dtype=torch.float64)
    pred = target.clone()
    pred[0] += 0.1
    pred[1] += 0.01
    assert psnr(pred, target).tolist() == pytest.approx([20.0, 40.0], abs=1e-9)


def test_border_crop_ignores_the_frame():
    target = torch.full((1, 3, 12, 12), 0.5)
    pred = target.clone()
    pred[..., :2, :] = 1.0  # damage only in a 2-pixel frame
    pred[..., -2:, :] = 0.0
    assert torch.isinf(psnr(pred, target, border=2)).all()
    assert math.isfinite(psnr(pred, target, border=1).item())


def test_values_outside_the_range_are_scored_clamped():
    target = torch.full((1, 3, 8, 8), 0.9)
    assert torch.isinf(psnr(target + 0.5, torch.ones_like(target))).all()


def test_rgb_to_y_matches_matlab_rgb2ycbcr_endpoints():
    black, white = torch.zeros(1, 3, 1, 1), torch.ones(1, 3, 1, 1)
    assert rgb_to_y(black).item() == pytest.approx(16 / 255)
    assert rgb_to_y(white).item() == pytest.approx(235 / 255)
    # Pure red: 16 + 65.481 (BT.601 studio swing).
    red = torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1)
    assert rgb_to_y(red).item() == pytest.approx((16 + 65.481) / 255)


def test_y_channel_psnr_equals_psnr_of_the_y_images():
    pred, target = _images(1)
    expected = psnr(rgb_to_y(pred), rgb_to_y(target))
    assert torch.allclose(psnr(pred, target, y_channel=True), expected)


@pytest.mark.parametrize("y_channel", [False, True])
def test_ssim_matches_scikit_image(y_channel):
    pred, target = _images(2)
    ours = ssim(pred, target, y_channel=y_channel)
    for i in range(pred.shape[0]):
        a, b = pred[i].double(), target[i].double()
        if y_channel:
            a, b = rgb_to_y(a[None])[0], rgb_to_y(b[None])[0]
        # Gaussian 11x11 window, sigma 1.5, population covariance: the SSIM paper's and BasicSR's choice.
        reference = structural_similarity(
            a.permute(1, 2, 0).numpy(), b.permute(1, 2, 0).numpy(), channel_axis=2, data_range=1.0,
            gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert ours[i].item() == pytest.approx(reference, abs=1e-6)


def test_ssim_falls_with_more_noise():
    target = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(target.shape, generator=torch.Generator().manual_seed(4))
    scores = [ssim((target + s * noise).clamp(0, 1), target).item() for s in (0.01, 0.05, 0.2)]
    assert scores[0] > scores[1] > scores[2]


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_psnr_agrees_with_numpy_on_8bit_images():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 256, (16, 16, 3)).astype(np.float64)
    b = np.clip(a + rng.integers(-9, 10, a.shape), 0, 255)
    expected = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))  # BasicSR's calculate_psnr on uint8 values
    to_tensor = lambda x: torch.from_numpy(x / 255.0).permute(2, 0, 1)[None]  # noqa: E731
    assert psnr(to_tensor(b), to_tensor(a)).item() == pytest.approx(expected, abs=1e-9)


def test_score_rates_the_restored_image_as_saved_and_the_input_as_given():
    from train.metrics import score, score_names
    from train.pixels import quantize

    torch.manual_seed(0)
    target = (torch.rand(2, 3, 24, 24) * 255).round() / 255
    restored = target + 0.0015  # off the 8-bit grid by less than half a step
    restored[0, 0, 0, 0] = 1.2  # out of range: saving clamps it
    degraded = target + 0.05 * torch.randn_like(target)
    figures = score(restored, degraded, target, y_channel=True, bits=8)
    assert tuple(figures) == score_names(True, 3) and all(v.shape == (2,) for v in figures.values())
    # Rounded to 8 bits every pixel lands back on the target (the raw float output scores ~56 dB).
    assert torch.equal(figures["psnr"], psnr(quantize(restored, 8), target))
    assert figures["psnr"][1] == math.inf and (psnr(restored, target) < 60).all()
    assert torch.equal(score(restored, degraded, target, bits=None)["psnr"], psnr(restored, target))
    assert torch.equal(figures["psnr_degraded"], psnr(degraded, target))
    assert torch.equal(quantize(restored, 16), (restored.clamp(0, 1) * 65535).round() / 65535)
    assert score_names(True, 1) == ("psnr", "ssim", "psnr_degraded", "ssim_degraded")  # no Y of a gray image
