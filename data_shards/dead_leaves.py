"""Dead-leaves images: synthetic training photos with the statistics that matter to a denoiser.

Opaque leaves fall on the canvas one behind the other (the first drawn stays on top). Most are
disks with radii from a power law p(r) ~ r^-alpha (alpha = 3 gives the scale invariance of natural
images); a fraction are thin straight bars, 1 to 5 pixels wide and up to the canvas long: the
lattices, wires, window frames and twigs of real scenes, which disks never draw and which a
denoiser trained without them smears. Colours come from a palette (the caller's choice: pixels of
real photos for natural colours, random ones for saturated colours). The result has what photos
have and a denoiser must keep: sharp occluding edges at every scale, thin lines, flat regions and
fine clutter. Rendered at `supersample` x the size and box-averaged, so edges are anti-aliased as a
camera's are. Seeded: the same rng state gives the same image.
"""

from __future__ import annotations

import numpy as np

BAR_HALF_WIDTH = (0.5, 2.5)  # output pixels: bars 1 to 5 pixels wide
BAR_HALF_LENGTH = (0.05, 0.5)  # of the canvas side


def dead_leaves(size: int, rng: np.random.Generator, palette: np.ndarray, min_radius: float = 1.0,
                alpha: float = 3.0, bar_fraction: float = 0.0, max_leaves: int = 30000,
                supersample: int = 2) -> np.ndarray:
    """uint8 (size, size, 3) image; `palette`: (N, 3) colours in 0-255. Disks have radii in
    [min_radius, size / 3] output pixels; each leaf is a bar instead with probability
    `bar_fraction` (a bar covers ~15x the area of an average disk: 0.015 gives ~1/5 of the image
    to bars). Pixels still bare after `max_leaves` leaves (a few in a million at the defaults) show
    a background colour, as if one more, infinite leaf lay behind."""
    if palette.ndim != 2 or palette.shape[1] != 3 or not len(palette):
        raise ValueError(f"dead_leaves: palette must be (N, 3) colours, got shape {palette.shape}")
    if not 0 <= bar_fraction <= 1:
        raise ValueError(f"dead_leaves: bar_fraction must be in [0, 1], got {bar_fraction}")
    canvas = size * supersample
    low, high = min_radius * supersample, canvas / 3
    image = np.empty((canvas, canvas, 3), np.float32)
    image[:] = palette[rng.integers(len(palette))]
    bare = np.ones((canvas, canvas), bool)
    coords = np.arange(canvas, dtype=np.float32)
    # Inverse CDF of the truncated power law.
    a, b = low ** (1 - alpha), high ** (1 - alpha)
    radii = (a - rng.random(max_leaves) * (a - b)) ** (1 / (1 - alpha))
    bar = rng.random(max_leaves) < bar_fraction
    # A bar's half-length, half-width and direction; its bounding box is that of a disk of radius `reach`.
    half_length = rng.uniform(*BAR_HALF_LENGTH, max_leaves) * canvas
    half_width = rng.uniform(*BAR_HALF_WIDTH, max_leaves) * supersample
    angle = rng.uniform(0, np.pi, max_leaves)
    reach = np.where(bar, half_length + half_width, radii)
    centres = rng.uniform(-reach[:, None], canvas + reach[:, None], (max_leaves, 2))
    colours = palette[rng.integers(len(palette), size=max_leaves)]
    top = np.clip((centres[:, 0] - reach).astype(int), 0, canvas)
    bottom = np.clip((centres[:, 0] + reach).astype(int) + 1, 0, canvas)
    left = np.clip((centres[:, 1] - reach).astype(int), 0, canvas)
    right = np.clip((centres[:, 1] + reach).astype(int) + 1, 0, canvas)
    for drawn, i in enumerate(np.flatnonzero((top < bottom) & (left < right))):
        y0, y1, x0, x1 = top[i], bottom[i], left[i], right[i]
        dy, dx = coords[y0:y1, None] - centres[i, 0], coords[None, x0:x1] - centres[i, 1]
        if bar[i]:
            sin, cos = np.sin(angle[i]), np.cos(angle[i])
            inside = (np.abs(dy * sin + dx * cos) <= half_length[i]) & (np.abs(dy * cos - dx * sin) <= half_width[i])
        else:
            inside = dy * dy + dx * dx <= radii[i] * radii[i]
        window = bare[y0:y1, x0:x1]
        hit = window & inside
        image[y0:y1, x0:x1][hit] = colours[i]
        window &= ~hit
        if drawn % 512 == 511 and not bare.any():
            break
    image = image.reshape(size, supersample, size, supersample, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
