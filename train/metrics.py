"""Image quality metrics on [0, 1] tensors (B, C, H, W), following the conventions of the
official Restormer/BasicSR evaluation: PSNR with data range 1, SSIM with an 11x11 Gaussian window
(sigma 1.5) computed per channel and averaged, Y channel from ITU-R BT.601 studio-swing RGB->YCbCr.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from train.pixels import quantize


def rgb_to_y(img: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 1, H, W) Y in [16/255, 235/255] (MATLAB's rgb2ycbcr)."""
    if img.shape[1] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels, got {img.shape[1]}")
    weights = img.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (img * weights).sum(dim=1, keepdim=True) / 255.0 + 16.0 / 255.0


def _prepare(pred: torch.Tensor, target: torch.Tensor, border: int, y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(f"metric inputs differ in shape: {tuple(pred.shape)} vs {tuple(target.shape)}")
    # Scored as a saved image would be: clamped to [0, 1]. float64 keeps the sums stable.
    pred = pred.detach().double().clamp(0, 1)
    target = target.detach().double().clamp(0, 1)
    if border:
        pred = pred[..., border:-border, border:-border]
        target = target[..., border:-border, border:-border]
    if y_channel and pred.shape[1] == 3:
        pred, target = rgb_to_y(pred), rgb_to_y(target)
    return pred, target


def psnr(pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,). Identical images give +inf."""
    pred, target = _prepare(pred, target, border, y_channel)
    mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(1.0 / mse)


SSIM_WINDOW = 11  # pixels: SSIM is computed where the whole window fits (the valid region)


def _gaussian_taps(size: int = SSIM_WINDOW, sigma: float = 1.5, dtype=torch.float64) -> torch.Tensor:
    coords = torch.arange(size, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(pred: torch.Tensor, target: torch.Tensor, border: int = 0, y_channel: bool = False) -> torch.Tensor:
    """Per-image SSIM, shape (B,): Gaussian 11x11 window, valid region only (no padding)."""
    pred, target = _prepare(pred, target, border, y_channel)
    if min(pred.shape[-2:]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW} pixels; this one is "
                         f"{pred.shape[-1]}x{pred.shape[-2]} after cropping a border of {border}")
    # The five local moments in one stack, blurred by the window's two 1-D factors: the same sums as
    # the 11x11 window, in 22 taps instead of 121 (SSIM of full-size photos dominated evaluation).
    stack = torch.cat([pred, target, pred * pred, target * target, pred * target], dim=1)
    taps = _gaussian_taps(dtype=stack.dtype).to(stack.device)
    planes = stack.shape[1]
    stack = F.conv2d(stack, taps.view(1, 1, 1, -1).expand(planes, 1, 1, -1), groups=planes)
    stack = F.conv2d(stack, taps.view(1, 1, -1, 1).expand(planes, 1, -1, 1), groups=planes)
    mu_x, mu_y, xx, yy, xy = stack.chunk(5, dim=1)
    sigma_x, sigma_y, sigma_xy = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def score_names(y_channel: bool, channels: int) -> tuple[str, ...]:
    """The figures `score` returns, in its order: Y-channel ones only for 3-channel images."""
    metrics = ("psnr", "ssim", "psnr_y", "ssim_y") if y_channel and channels == 3 else ("psnr", "ssim")
    return tuple(f"{m}{suffix}" for suffix in ("", "_degraded") for m in metrics)


def score(restored: torch.Tensor, degraded: torch.Tensor, target: torch.Tensor, *, border: int = 0,
          y_channel: bool = False, bits: int | None = 8) -> dict[str, torch.Tensor]:
    """Per-image figures (each of shape (B,)) of a restored batch and of its degraded input.

    The one scoring rule of validation and of tools.evaluate, as the official scripts score: the
    restored image as it would be saved (clamped and rounded to `bits`, the target's bit depth; None
    scores the raw float output), the degraded input as given. Names: `score_names`.
    """
    figures = {}
    for suffix, img in (("", quantize(restored, bits)), ("_degraded", degraded)):
        figures[f"psnr{suffix}"] = psnr(img, target, border)
        figures[f"ssim{suffix}"] = ssim(img, target, border)
        if y_channel and target.shape[1] == 3:
            figures[f"psnr_y{suffix}"] = psnr(img, target, border, y_channel=True)
            figures[f"ssim_y{suffix}"] = ssim(img, target, border, y_channel=True)
    return {name: figures[name] for name in score_names(y_channel, target.shape[1])}
