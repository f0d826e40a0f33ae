"""Image files <-> [0, 1] float tensors, keeping the file's bit depth for what is written back.

Decoding and PNG encoding are data_shards.codec's (it reads 16-bit RGB PNGs that Pillow would cut to
8 bits). This module adds the tensor side: an 8-bit file becomes v / 255, a 16-bit one v / 65535, and
writing undoes exactly that, so a pixel a model leaves alone is written back unchanged.
"""

from __future__ import annotations

import glob
from pathlib import Path

import numpy as np
import torch

from data_shards.codec import IMAGE_SUFFIXES, MAX_PIXELS, ImageError, PixelLimitError, encode_png, read_image, to_channels
from train.pixels import to_array

__all__ = ["MAX_PIXELS", "ImageError", "PixelLimitError", "collect_images", "read_tensor", "write_png"]


def read_tensor(path: str | Path, channels: int, max_pixels: int = MAX_PIXELS) -> tuple[torch.Tensor, int]:
    """An image file -> ((1, channels, H, W) float32 in [0, 1], bit depth 8 or 16).

    channels: 3 replicates a gray file to RGB, 1 converts RGB to luma (ITU-R 601); alpha is dropped.
    An image over `max_pixels` raises PixelLimitError before it is decoded.
    """
    try:
        array, _ = to_channels(read_image(path, max_pixels), "gray" if channels == 1 else "rgb")
    except ImageError as err:
        raise type(err)(f"{path}: {err}") from err
    except OSError as err:
        raise ImageError(f"{path}: cannot read ({err.strerror or err})") from err
    bits = 16 if array.dtype == np.uint16 else 8
    # v / 65535 divided in float64 and rounded once is the nearest float32, which rounds back to v on
    # writing. Looked up from a table of all 2**bits levels, the image never has a float64 copy.
    levels = (np.arange(2**bits, dtype=np.float64) / float(2**bits - 1)).astype(np.float32)
    planes = np.ascontiguousarray(array.transpose(2, 0, 1))
    del array
    return torch.from_numpy(levels[planes]).unsqueeze(0), bits


def write_png(path: str | Path, img: torch.Tensor, bits: int) -> Path:
    """Writes a [0, 1] image as an 8- or 16-bit PNG (gray or RGB); creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(to_array(img, bits)))
    return path


def collect_images(specs: list[str]) -> list[Path]:
    """Files, folders (their images, sorted, not recursive) and glob patterns -> image paths, in order.

    Raises FileNotFoundError naming the first spec that matches nothing.
    """
    found: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            matches = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"{spec}: folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        elif path.is_file():
            matches = [path]
        elif glob.has_magic(spec):
            matches = sorted(Path(p) for p in glob.glob(spec, recursive=True)
                             if Path(p).is_file() and Path(p).suffix.lower() in IMAGE_SUFFIXES)
            if not matches:
                raise FileNotFoundError(f"{spec}: the pattern matches no image files")
        else:
            raise FileNotFoundError(f"{spec}: no such file or folder")
        found.extend(matches)
    return list(dict.fromkeys(found))  # a file named twice is restored once
