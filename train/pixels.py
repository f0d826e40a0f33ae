"""Float images in [0, 1] <-> the 8/16-bit integers they are saved as: one rounding rule for the
files restore writes, the sample grids, and the scores of images "as they would be saved"."""

from __future__ import annotations

import numpy as np
import torch

_DTYPES = {8: np.uint8, 16: np.uint16}


def quantize(img: torch.Tensor, bits: int | None) -> torch.Tensor:
    """What saving as an 8/16-bit image would leave: round(clamp(x, 0, 1) * (2^bits - 1)) / (2^bits - 1).

    bits=None leaves the image as it is (a score of the raw float output)."""
    if bits is None:
        return img
    top = float(_levels(bits))
    return (img.clamp(0, 1) * top).round() / top


def to_array(img: torch.Tensor, bits: int) -> np.ndarray:
    """(C, H, W) or (1, C, H, W) float -> (H, W, C) uint8/uint16: round(clamp(x, 0, 1) * (2^bits - 1))."""
    if img.dim() == 4:
        if img.shape[0] != 1:
            raise ValueError(f"to_array takes one image, got a batch of {img.shape[0]}")
        img = img[0]
    # float64: v / 65535 read as float32 must round back to v.
    values = (img.detach().double().clamp(0, 1) * _levels(bits)).round().permute(1, 2, 0).cpu().numpy()
    return values.astype(_DTYPES[bits])


def _levels(bits: int) -> int:
    if bits not in _DTYPES:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    return 2**bits - 1
