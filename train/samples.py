"""The degraded | restored | target sample grid saved at every validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from train.pixels import to_array


def center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    h, w = img.shape[-2:]
    top, left = max((h - size) // 2, 0), max((w - size) // 2, 0)
    return img[..., top : top + size, left : left + size]


def to_rgb8(img: torch.Tensor) -> np.ndarray:
    """(C, H, W) float in [0, 1] -> (H, W, 3) uint8 as an 8-bit file would hold it."""
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    elif img.shape[0] > 3:  # dual-pixel inputs: show the first view
        img = img[:3]
    return to_array(img, 8)


def save_grid(rows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], path: Path, crop: int, gap: int = 4) -> Path:
    """One row per image: degraded | restored | target, each center-cropped to `crop` pixels."""
    tiles = [[to_rgb8(center_crop(t, crop)) for t in row] for row in rows]
    height = max(t.shape[0] for row in tiles for t in row)
    width = max(t.shape[1] for row in tiles for t in row)
    canvas = np.full((len(tiles) * (height + gap) - gap, 3 * (width + gap) - gap, 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            y, x = r * (height + gap), c * (width + gap)
            canvas[y : y + tile.shape[0], x : x + tile.shape[1]] = tile
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path)
    return path
