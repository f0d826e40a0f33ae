"""Dead-leaves images: synthetic training photos with the statistics that matter to a denoiser.

Opaque disks fall on the canvas one behind the other (the first drawn stays on top); radii follow a
power law p(r) ~ r^-alpha (alpha = 3 gives the scale invariance of natural images), colours come
from a palette (pixels sampled from real photos, so the colour statistics are natural too). The
result has what real photos have and a denoiser must keep: sharp occluding edges at every scale,
flat regions and fine clutter. Rendered at `supersample` x the size and box-averaged, so edges are
anti-aliased as a camera's are. Seeded: the same rng state gives the same image.
"""

from __future__ import annotations

import numpy as np


def dead_leaves(size: int, rng: np.random.Generator, palette: np.ndarray, min_radius: float = 1.0,
                alpha: float = 3.0, max_disks: int = 30000, supersample: int = 2) -> np.ndarray:
    """uint8 (size, size, 3) image; `palette`: (N, 3) colours in 0-255. Disks have radii in
    [min_radius, size / 3] output pixels. Pixels still bare after `max_disks` disks (a few in a
    million at the defaults) show a background colour, as if one more, infinite leaf lay behind."""
    if palette.ndim != 2 or palette.shape[1] != 3 or not len(palette):
        raise ValueError(f"dead_leaves: palette must be (N, 3) colours, got shape {palette.shape}")
    canvas = size * supersample
    low, high = min_radius * supersample, canvas / 3
    image = np.empty((canvas, canvas, 3), np.float32)
    image[:] = palette[rng.integers(len(palette))]
    bare = np.ones((canvas, canvas), bool)
    coords = np.arange(canvas, dtype=np.float32)
    # Inverse CDF of the truncated power law.
    a, b = low ** (1 - alpha), high ** (1 - alpha)
    radii = (a - rng.random(max_disks) * (a - b)) ** (1 / (1 - alpha))
    centres = rng.uniform(-radii[:, None], canvas + radii[:, None], (max_disks, 2))
    colours = palette[rng.integers(len(palette), size=max_disks)]
    top = np.clip((centres[:, 0] - radii).astype(int), 0, canvas)
    bottom = np.clip((centres[:, 0] + radii).astype(int) + 1, 0, canvas)
    left = np.clip((centres[:, 1] - radii).astype(int), 0, canvas)
    right = np.clip((centres[:, 1] + radii).astype(int) + 1, 0, canvas)
    for drawn, i in enumerate(np.flatnonzero((top < bottom) & (left < right))):
        y0, y1, x0, x1 = top[i], bottom[i], left[i], right[i]
        (cy, cx), r = centres[i], radii[i]
        window = bare[y0:y1, x0:x1]
        inside = (coords[y0:y1, None] - cy) ** 2 + (coords[None, x0:x1] - cx) ** 2 <= r * r
        hit = window & inside
        image[y0:y1, x0:x1][hit] = colours[i]
        window &= ~hit
        if drawn % 512 == 511 and not bare.any():
            break
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
