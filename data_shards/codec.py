"""Lossless image reading and encoding: 8/16-bit PNG, npy, gray or RGB, as numpy (H, W, C) arrays.

Pillow decodes 16-bit RGB(A) PNGs to 8 bits silently (it keeps the high byte). DPDD is 16-bit RGB,
so `decode_png` reads those files twice through Pillow's C decoder, once for the high and once for
the low byte of every sample, and `encode_png` writes them with its own minimal PNG writer.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy"})

# Pillow's 16-bit raw modes for which it only keeps the high byte, and the mode that reads the low one.
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}


class ImageError(ValueError):
    """An image that cannot be read or stored losslessly; the message says why."""


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> uint8 or uint16 array of shape (H, W, C), C in {1, 2, 3, 4}, values as stored."""
    return _from_pil(Image.open(io.BytesIO(data)), lambda: Image.open(io.BytesIO(data)))


def decode_npy(data: bytes) -> np.ndarray:
    """npy bytes -> array; never unpickles (a shard is untrusted input)."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    return array[..., None] if array.ndim == 2 else array


def encode_npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(array), allow_pickle=False)
    return out.getvalue()


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """(H, W, 1|3) uint8/uint16 -> PNG bytes, bit-exact. `level` is the zlib level (1 packs fast)."""
    if array.ndim != 3 or array.shape[2] not in (1, 3) or array.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"cannot store an array of shape {array.shape} and dtype {array.dtype} as PNG")
    if array.dtype == np.uint16 and array.shape[2] == 3:
        return _encode_png16_rgb(array, level)
    image = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=level)
    return out.getvalue()


def read_image(path: str | Path) -> np.ndarray:
    """Any supported file -> uint8/uint16 (H, W, C) array exactly as stored (alpha still attached)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            array = array[..., None] if array.ndim == 2 else array
        elif suffix in (".tif", ".tiff"):
            import tifffile  # ships with scikit-image; Pillow truncates 16-bit RGB TIFFs too

            array = tifffile.imread(path)
            array = array[..., None] if array.ndim == 2 else array
        else:
            array = _from_pil(Image.open(path), lambda: Image.open(path))
    except ImageError:
        raise
    except Exception as err:  # Pillow, tifffile and numpy raise many types for a corrupt file
        raise ImageError(f"cannot decode ({type(err).__name__}: {err})") from err
    if array.ndim != 3 or array.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported pixel layout: shape {array.shape}, dtype {array.dtype} "
                         "(need 8- or 16-bit gray or RGB)")
    return array


def to_channels(array: np.ndarray, color: str) -> tuple[np.ndarray, str | None]:
    """Applies the pack's colour policy; returns the array and a note when something was dropped.

    color: 'keep' (as stored), 'rgb' (gray is replicated to 3 channels) or 'gray' (ITU-R 601 luma,
    rounded, as Pillow's convert('L') does).
    """
    note = None
    channels = array.shape[2]
    if channels in (2, 4):
        array = array[:, :, : channels - 1]
        note = "alpha channel dropped"
    if array.shape[2] not in (1, 3):
        raise ImageError(f"unsupported channel count {channels}")
    if color == "rgb" and array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    elif color == "gray" and array.shape[2] == 3:
        luma = array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        array = np.round(luma).astype(array.dtype)[:, :, None]
    return np.ascontiguousarray(array), note


def _from_pil(image: Image.Image, reopen) -> np.ndarray:
    raw_mode = image.tile[0].args if image.format == "PNG" and image.tile else None
    if isinstance(raw_mode, tuple):
        raw_mode = raw_mode[0]
    if raw_mode in _LOW_BYTE_RAWMODE:
        high = np.asarray(image)
        low_image = reopen()
        low_image.tile = [tile._replace(args=_LOW_BYTE_RAWMODE[raw_mode]) for tile in low_image.tile]
        low = np.asarray(low_image)
        array = (high.astype(np.uint16) << 8) | low
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        array = np.asarray(image).astype(np.uint16)
    elif image.mode in ("L", "LA", "RGB", "RGBA"):
        array = np.asarray(image)
    elif image.mode == "I":  # some 16-bit gray files open as 32-bit integers
        array = np.asarray(image)
        if array.min() < 0 or array.max() > 65535:
            raise ImageError("32-bit integer image with values outside 0..65535")
        array = array.astype(np.uint16)
    elif image.mode in ("1", "P", "PA", "CMYK", "YCbCr"):
        array = np.asarray(image.convert("RGBA" if "transparency" in image.info or image.mode == "PA"
                                         else ("L" if image.mode == "1" else "RGB")))
    else:
        raise ImageError(f"unsupported image mode {image.mode!r}")
    return array[..., None] if array.ndim == 2 else array


def _encode_png16_rgb(array: np.ndarray, level: int) -> bytes:
    height, width, _ = array.shape
    rows = array.astype(">u2").reshape(height, width * 3).view(np.uint8)
    # Filter type 2 ("Up") for every row: a vectorised delta that compresses photos well.
    filtered = np.empty((height, 1 + width * 6), dtype=np.uint8)
    filtered[:, 0] = 2
    filtered[:, 1:] = rows
    filtered[1:, 1:] -= rows[:-1]

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(filtered.tobytes(), level)) + chunk(b"IEND", b""))
