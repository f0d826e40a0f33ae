"""Lossless image reading and encoding: 8/16-bit PNG, npy, gray or RGB, as numpy (H, W, C) arrays.

Pillow decodes 16-bit RGB(A) PNGs to 8 bits silently (it keeps the high byte). DPDD is 16-bit RGB,
so `decode_png` reads those files twice through Pillow's C decoder, once for the high and once for
the low byte of every sample, and `encode_png` writes them with its own minimal PNG writer.

Every decoder here checks the image's size from its header (Pillow's size, tifffile's series shape,
the npy header) against one pixel limit, MAX_PIXELS, before it decodes a byte: a small file that
claims a huge image (a decompression bomb) is refused with PixelLimitError and allocates nothing.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".npy"})

# The most pixels (height x width) an image may have, for every decoder of the project: the packer's
# workers, the training stream's loader workers, verify, restore and evaluate. Decoding a 16-bit RGB
# PNG peaks at about 16 bytes per pixel (measured; restore's float32 tensor adds little more), so at
# 2**26 pixels (8192 x 8192) one image costs a loader worker or restore about 1 GiB, where the
# 12000 x 12000 16-bit PNG of issue 28 cost 4.3 GB per worker. The limit is above every public
# restoration set (SIDD and DPDD frames are under 17 MP) and a 61 MP full-frame photo. For larger
# images pack and restore take --max-pixels (pack must then cut them with --tile, as the stream
# keeps this limit; restore bounds the model's memory with its own --tile).
MAX_PIXELS = 1 << 26

# check_pixels replaces Pillow's own bomb check (a warning above 89 MP, an error above 179 MP): that
# one would refuse what --max-pixels allows, and warn about images that check_pixels refuses anyway.
Image.MAX_IMAGE_PIXELS = None

# Pillow's 16-bit raw modes for which it only keeps the high byte, and the mode that reads the low one.
_LOW_BYTE_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L"}
_TIFF_AXES = ("YX", "YXS", "SYX")  # one 2-D image: gray, interleaved or planar samples


class ImageError(ValueError):
    """An image that cannot be read or stored losslessly; the message says why."""


class PixelLimitError(ImageError):
    """An image whose header claims more pixels than the limit; nothing of it was decoded."""


def check_pixels(height: int, width: int, max_pixels: int = MAX_PIXELS) -> None:
    """Raises PixelLimitError when a height x width image is over `max_pixels`."""
    if height * width > max_pixels:
        raise PixelLimitError(f"{width}x{height} is {height * width:,} pixels, over the limit of {max_pixels:,}")


def decode_png(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """PNG bytes -> uint8 or uint16 array of shape (H, W, C), C in {1, 2, 3, 4}, values as stored."""
    return _from_pil(lambda: Image.open(io.BytesIO(data)), max_pixels)


def decode_npy(data: bytes, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """npy bytes -> array; never unpickles (a shard is untrusted input)."""
    return _load_npy(io.BytesIO(data), max_pixels)


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


def read_image(path: str | Path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Any supported file -> uint8/uint16 (H, W, C) array exactly as stored (alpha still attached)."""
    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            with open(path, "rb") as file:
                array = _load_npy(file, max_pixels)
        elif suffix in (".tif", ".tiff"):
            array = _read_tiff(path, max_pixels)
        else:
            array = _from_pil(lambda: Image.open(path), max_pixels)
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


def _load_npy(file, max_pixels: int) -> np.ndarray:
    """An open npy file -> (H, W, C) array; the header's shape and dtype are checked before the data
    is read (np.load allocates what the header claims)."""
    start = file.tell()
    version = np.lib.format.read_magic(file)
    if version not in ((1, 0), (2, 0)):
        raise ImageError(f"npy format version {version[0]}.{version[1]} is not supported (1.0 or 2.0)")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(file)
    if len(shape) not in (2, 3):
        raise ImageError(f"unsupported pixel layout: shape {shape} (need (H, W) or (H, W, C))")
    _check_header(shape[0], shape[1], shape[2] if len(shape) == 3 else 1, dtype, max_pixels)
    file.seek(start)
    array = np.load(file, allow_pickle=False)
    return array[..., None] if array.ndim == 2 else array


def _read_tiff(path: Path, max_pixels: int) -> np.ndarray:
    import tifffile  # ships with scikit-image; Pillow truncates 16-bit RGB TIFFs too

    with tifffile.TiffFile(path) as tiff:
        series = tiff.series[0]
        if series.axes not in _TIFF_AXES:
            raise ImageError(f"TIFF of shape {series.shape} (axes {series.axes}) is not one 2-D image: "
                             "pages, volumes and stacks are not read")
        shape = dict(zip(series.axes, series.shape))
        _check_header(shape["Y"], shape["X"], shape.get("S", 1), series.dtype, max_pixels)
        array = series.asarray()
    if series.axes == "SYX":
        return np.ascontiguousarray(np.moveaxis(array, 0, -1))
    return array[..., None] if array.ndim == 2 else array


def _check_header(height: int, width: int, channels: int, dtype: np.dtype, max_pixels: int) -> None:
    check_pixels(height, width, max_pixels)
    if channels > 4 or np.dtype(dtype) not in (np.uint8, np.uint16):
        raise ImageError(f"unsupported pixel layout: {channels} channels of {dtype} (need 8- or 16-bit gray or RGB)")


def _from_pil(open_image, max_pixels: int) -> np.ndarray:
    """Decodes the image that `open_image()` opens, after checking its header's size."""
    image = open_image()
    check_pixels(image.height, image.width, max_pixels)
    raw_mode = image.tile[0].args if image.format == "PNG" and image.tile else None
    if isinstance(raw_mode, tuple):
        raw_mode = raw_mode[0]
    if raw_mode in _LOW_BYTE_RAWMODE:
        # In place, closing each Pillow image once read: the peak is 16 bytes per pixel, not 26.
        array = np.asarray(image).astype(np.uint16)
        image.close()
        array <<= 8
        low_image = open_image()
        low_image.tile = [tile._replace(args=_LOW_BYTE_RAWMODE[raw_mode]) for tile in low_image.tile]
        array |= np.asarray(low_image)
        low_image.close()
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
