"""Pixel-grid geometry shared by packing, augmentation and inference: tile origins and the 8
flips/rotations of the square. One definition each, so a tile or an augmented view means the same
thing when it is written, trained on and restored."""

from __future__ import annotations

import numpy as np


def tile_positions(length: int, tile: int, stride: int) -> list[int]:
    """Tile origins along one axis: every `stride` pixels, plus one flush with the far edge."""
    if length <= tile:
        return [0]
    positions = list(range(0, length - tile + 1, stride))
    if positions[-1] != length - tile:
        positions.append(length - tile)
    return positions


def dihedral(image, mode: int, axes: tuple[int, int] = (0, 1)):
    """The mode-th of the 8 flips/rotations of the square (mode 0 is the identity) over `axes`
    (rows, columns): modes 4-7 flip the rows first, then every mode turns (mode % 4) quarter turns.

    Works on numpy arrays (returns a view) and torch tensors alike: (0, 1) for an (H, W, C) array,
    (-2, -1) for a (B, C, H, W) tensor.
    """
    if isinstance(image, np.ndarray):
        if mode >= 4:
            image = np.flip(image, axes[0])
        return np.rot90(image, k=mode % 4, axes=axes)
    if mode >= 4:
        image = image.flip(axes[0])
    return image.rot90(mode % 4, axes)


def undo_dihedral(image, mode: int, axes: tuple[int, int] = (0, 1)):
    """The inverse of dihedral(., mode, axes)."""
    if isinstance(image, np.ndarray):
        image = np.rot90(image, k=-(mode % 4), axes=axes)
        return np.flip(image, axes[0]) if mode >= 4 else image
    image = image.rot90(-(mode % 4), axes)
    return image.flip(axes[0]) if mode >= 4 else image
