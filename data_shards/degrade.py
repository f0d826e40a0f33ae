"""Crops, augmentations and synthetic degradations on numpy (H, W, C) float32 images in [0, 1].

All randomness comes from an explicit numpy Generator, so a stream is reproducible from its seeds.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class NoiseConfig:
    """Additive white Gaussian noise; sigmas in 0-255 units (sigma=25 means 25/255).

    sigma: fixed level; sigma_range: blind training, sigma ~ U[low, high] per sample (paper: [0, 50]).
    clip: clamp the noisy image to [0, 1]; the paper does not clip.
    """

    sigma: float | None = None
    sigma_range: tuple[float, float] | None = None
    clip: bool = False

    def __post_init__(self):
        if (self.sigma is None) == (self.sigma_range is None):
            raise ValueError("NoiseConfig: give exactly one of sigma (e.g. 25) or sigma_range (e.g. (0, 50))")
        if self.sigma is not None and self.sigma < 0:
            raise ValueError(f"NoiseConfig: sigma={self.sigma} must be >= 0")
        if self.sigma_range is not None:
            low, high = self.sigma_range
            if not 0 <= low <= high:
                raise ValueError(f"NoiseConfig: sigma_range={self.sigma_range} needs 0 <= low <= high")

    def draw_sigma(self, rng: np.random.Generator) -> float:
        if self.sigma is not None:
            return self.sigma / 255.0
        low, high = self.sigma_range
        return rng.uniform(low, high) / 255.0


def key_seed(key: str, seed: int = 0) -> list[int]:
    """Seed material for the noise of one named image (validation, evaluation): the user's seed and
    a stable hash of the name, so an image gets the same noise in every tool, run and world size."""
    return [seed, int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")]


def add_noise(clean: np.ndarray, noise: NoiseConfig, rng: np.random.Generator) -> np.ndarray:
    sigma = np.float32(noise.draw_sigma(rng))
    noisy = clean + sigma * rng.standard_normal(clean.shape, dtype=np.float32)
    return np.clip(noisy, 0.0, 1.0, out=noisy) if noise.clip else noisy


def paired_crop(images: list[np.ndarray], patch: int, rng: np.random.Generator) -> list[np.ndarray]:
    """The same random patch x patch window from every image (all the same size).

    Images smaller than the patch are padded by mirroring (numpy 'symmetric' = OpenCV BORDER_REFLECT,
    what the official code's padding uses) before cropping.
    """
    height, width = images[0].shape[:2]
    pad_h, pad_w = max(0, patch - height), max(0, patch - width)
    if pad_h or pad_w:
        images = [np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)), mode="symmetric") for image in images]
        height, width = height + pad_h, width + pad_w
    y = int(rng.integers(0, height - patch + 1))
    x = int(rng.integers(0, width - patch + 1))
    return [image[y:y + patch, x:x + patch] for image in images]


def mixup(inputs: np.ndarray, targets: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Restormer's mixing augmentation on a batch: lam ~ Beta(1.2, 1.2), mixed with a permuted copy.

    As the official Mixing_Augment with `use_identity: true` (every official mixup recipe), the batch
    is left as it is with probability 1/2. The same lam and permutation apply to input and target, so
    every pair stays consistent.
    """
    if rng.random() < 0.5:
        return inputs, targets
    lam = np.float32(rng.beta(1.2, 1.2))
    order = rng.permutation(len(inputs))
    return lam * inputs + (1 - lam) * inputs[order], lam * targets + (1 - lam) * targets[order]
