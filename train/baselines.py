"""Classical Gaussian denoisers scored on the validation images, so a trained model has a yardstick.

Both come from scikit-image and know the true noise level: `denoise_wavelet` (BayesShrink, soft
thresholds, in YCbCr) and `denoise_nl_means` (fast mode, 5x5 patches, 13x13 search window) with
its filter strength h picked as the best of `NLM_H_FACTORS` x sigma on these very images (an
oracle choice: the strongest version of the filter a user could tune; found by walking uphill on
the grid, PSNR over h having a single peak). Scored with the trainer's
own metrics (train.metrics: clamped to [0, 1], data range 1), beside the noisy input.

`cbm3d_score` scores CBM3D (the `bm3d` package, colour BM3D with the true sigma), the classical
reference of image denoising. It is not in the demo's summary, which would take a good part of the
demo's time again to score it (its seconds per image: docs/demo.md); benchmarks/demo_quality.py
scores it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from train.metrics import psnr, ssim

NLM_H_FACTORS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class Score:
    psnr: float
    ssim: float


@dataclass(frozen=True)
class Baselines:
    images: int
    sigma: float  # 0-255 units
    noisy: Score
    wavelet: Score
    nl_means: Score
    nl_means_h: float  # the chosen h, as a multiple of sigma

    def to_dict(self) -> dict:
        return {"images": self.images, "sigma": self.sigma, "nl_means_h_over_sigma": self.nl_means_h,
                **{f"{name}/{metric}": getattr(getattr(self, name), metric)
                   for name in ("noisy", "wavelet", "nl_means") for metric in ("psnr", "ssim")}}


def classical_baselines(items: Iterable[dict], sigma: float, border: int = 0) -> Baselines:
    """`items`: validation samples {'input': (1, C, H, W) noisy, 'target': (1, C, H, W) clean} in [0, 1]
    (a data_shards val loader); `sigma` in 0-255 units, the level the noise was drawn with."""
    from skimage.restoration import denoise_nl_means, denoise_wavelet

    s = sigma / 255.0
    sums: dict[str, np.ndarray] = {}

    def add(name: str, output: np.ndarray, target: torch.Tensor) -> None:
        sums[name] = sums.get(name, 0.0) + _scores(output, target, border)

    images = []
    for item in items:
        noisy, target = _noisy_and_target(item)
        add("noisy", noisy, target)
        add("wavelet", denoise_wavelet(noisy, sigma=s, method="BayesShrink", mode="soft", channel_axis=-1,
                                       convert2ycbcr=noisy.shape[-1] == 3, rescale_sigma=True), target)
        images.append((noisy, target))
    if not images:
        raise ValueError("classical_baselines: no validation images")

    def nl_means(index: int) -> float:
        name = f"nlm{NLM_H_FACTORS[index]}"
        if name not in sums:
            for noisy, target in images:
                add(name, denoise_nl_means(noisy, h=NLM_H_FACTORS[index] * s, sigma=s, fast_mode=True,
                                           patch_size=5, patch_distance=6, channel_axis=-1), target)
        return sums[name][0]

    # PSNR over h rises to one peak and falls: walking uphill from the usual best finds the grid's
    # best in 3-4 filter passes instead of 8 (each pass is seconds per photo).
    best = NLM_H_FACTORS.index(0.5)
    for step in (-1, 1):
        while 0 <= best + step < len(NLM_H_FACTORS) and nl_means(best + step) > nl_means(best):
            best += step

    def score(name: str) -> Score:
        return Score(*(float(v) for v in sums[name] / len(images)))

    return Baselines(len(images), sigma, score("noisy"), score("wavelet"), score(f"nlm{NLM_H_FACTORS[best]}"),
                     NLM_H_FACTORS[best])


def cbm3d_score(items: Iterable[dict], sigma: float, border: int = 0) -> tuple[Score, float]:
    """CBM3D's mean PSNR/SSIM on `items` (as classical_baselines takes them) and its seconds per image."""
    from bm3d import bm3d_rgb

    sums, seconds, count = np.zeros(2), 0.0, 0
    for item in items:
        noisy, target = _noisy_and_target(item)
        if noisy.shape[-1] != 3:
            raise ValueError("cbm3d_score: CBM3D denoises RGB images")
        started = time.perf_counter()
        restored = bm3d_rgb(noisy, sigma / 255.0)
        seconds += time.perf_counter() - started
        sums += _scores(restored, target, border)
        count += 1
    if not count:
        raise ValueError("cbm3d_score: no images")
    return Score(*(float(v) for v in sums / count)), seconds / count


def _noisy_and_target(item: dict) -> tuple[np.ndarray, torch.Tensor]:
    target = item["target"]
    return item["input"][0, : target.shape[1]].permute(1, 2, 0).double().numpy(), target


def _scores(output: np.ndarray, target: torch.Tensor, border: int) -> np.ndarray:
    restored = torch.from_numpy(np.ascontiguousarray(output.transpose(2, 0, 1)))[None]
    return np.array([psnr(restored, target, border).item(), ssim(restored, target, border).item()])
