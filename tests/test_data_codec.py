"""Lossless image codecs and the augmentation/degradation primitives of data_shards."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from conftest import image_bomb
from data_shards.codec import (MAX_PIXELS, ImageError, PixelLimitError, decode_npy, decode_png, encode_npy, encode_png,
                               read_image, to_channels)
from data_shards.degrade import NoiseConfig, add_noise, mixup, paired_crop
from data_shards.geometry import dihedral


def _png16_rgb_all_filters(image: np.ndarray) -> bytes:
    """16-bit RGB PNG whose rows cycle through all five PNG filter types (what libpng may write)."""
    height, width, _ = image.shape
    rows = image.astype(">u2").reshape(height, width * 3).view(np.uint8).astype(np.int32)
    bpp, out = 6, []
    for r in range(height):
        kind = r % 5
        cur = rows[r]
        up = rows[r - 1] if r else np.zeros_like(cur)
        left = np.concatenate([np.zeros(bpp, np.int32), cur[:-bpp]])
        up_left = np.concatenate([np.zeros(bpp, np.int32), up[:-bpp]])
        if kind == 0:
            pred = np.zeros_like(cur)
        elif kind == 1:
            pred = left
        elif kind == 2:
            pred = up
        elif kind == 3:
            pred = (left + up) // 2
        else:
            p = left + up - up_left
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - up_left)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, up_left))
        out.append(bytes([kind]) + ((cur - pred) % 256).astype(np.uint8).tobytes())

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(out))) + chunk(b"IEND", b""))


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 1), (np.uint8, 3), (np.uint16, 1), (np.uint16, 3)])
def test_png_and_npy_round_trip_bit_exact(dtype, channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, np.iinfo(dtype).max + 1, (13, 17, channels), dtype=np.int64).astype(dtype)
    image[0, 0] = np.iinfo(dtype).max
    image[0, 1] = 0
    for decoded in (decode_png(encode_png(image)), decode_npy(encode_npy(image))):
        assert decoded.dtype == dtype and np.array_equal(decoded, image)


def test_16bit_rgb_png_keeps_low_byte_with_every_filter(tmp_path):
    # Pillow alone would return 8 bits here; every PNG filter type must decode exactly.
    image = np.random.default_rng(1).integers(0, 65536, (11, 9, 3)).astype(np.uint16)
    path = tmp_path / "deep.png"
    path.write_bytes(_png16_rgb_all_filters(image))
    assert np.array_equal(read_image(path), image)


def test_read_image_formats_and_corrupt_file(tmp_path):
    gray16 = np.random.default_rng(2).integers(0, 65536, (8, 10)).astype(np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert np.array_equal(read_image(tmp_path / "g16.png")[..., 0], gray16)
    import tifffile

    rgb16 = np.random.default_rng(3).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "c16.tif", rgb16)
    assert np.array_equal(read_image(tmp_path / "c16.tif"), rgb16)
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="cannot decode"):
        read_image(tmp_path / "bad.png")


@pytest.mark.parametrize("name,bits", [("a.png", 8), ("a.png", 16), ("a.tif", 8), ("a.tif", 16), ("a.npy", 8),
                                       ("a.npy", 16)])
def test_an_image_bomb_is_refused_from_its_header(tmp_path, name, bits):
    bomb = image_bomb(tmp_path / name, 14000, 14000, bits)  # a few hundred bytes claiming 196 MP
    with pytest.raises(PixelLimitError, match=f"14000x14000 is 196,000,000 pixels, over the limit of {MAX_PIXELS:,}"):
        read_image(bomb)
    decoder = {".png": decode_png, ".npy": decode_npy}.get(bomb.suffix)
    if decoder is not None:  # the formats a shard may hold
        with pytest.raises(PixelLimitError, match="14000x14000"):
            decoder(bomb.read_bytes())


@pytest.mark.parametrize("name", ["g8.png", "c16.png", "c8.jpg", "g16.tif", "c16.tif", "c8.npy"])
def test_every_decoder_applies_the_pixel_limit_given(tmp_path, name):
    import tifffile

    bits = 16 if "16" in name else 8
    image = np.random.default_rng(4).integers(0, 2**bits, (6, 5, 1 if name[0] == "g" else 3)).astype(
        np.uint16 if bits == 16 else np.uint8)
    path = tmp_path / name
    if path.suffix == ".tif":
        tifffile.imwrite(path, image[..., 0] if image.shape[2] == 1 else image)
    elif path.suffix == ".npy":
        np.save(path, image)
    elif path.suffix == ".jpg":
        Image.fromarray(image).save(path)
    else:
        path.write_bytes(encode_png(image))
    assert read_image(path, max_pixels=30).shape == image.shape
    with pytest.raises(PixelLimitError, match="5x6 is 30 pixels, over the limit of 29"):
        read_image(path, max_pixels=29)


def test_planar_tiffs_are_read_and_stacks_refused(tmp_path):
    import tifffile

    rgb = np.random.default_rng(5).integers(0, 65536, (4, 6, 3)).astype(np.uint16)
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), planarconfig="separate", photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "planar.tif"), rgb)
    tifffile.imwrite(tmp_path / "stack.tif", np.zeros((5, 4, 6), np.uint8), photometric="minisblack")
    with pytest.raises(ImageError, match="not one 2-D image"):
        read_image(tmp_path / "stack.tif")
    np.save(tmp_path / "wide.npy", np.zeros((2, 2, 5000), np.uint8))  # few pixels, many channels
    with pytest.raises(ImageError, match="5000 channels"):
        read_image(tmp_path / "wide.npy")


def test_to_channels_drops_alpha_with_note_and_converts():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgb, note = to_channels(rgba, "keep")
    assert rgb.shape == (4, 4, 3) and note == "alpha channel dropped"
    gray = np.full((4, 4, 1), 7, np.uint16)
    assert to_channels(gray, "rgb")[0].shape == (4, 4, 3)
    assert to_channels(np.full((2, 2, 3), 200, np.uint8), "gray")[0][0, 0, 0] == 200


def test_decode_npy_refuses_pickled_objects():
    import io

    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buffer.getvalue())


def test_dihedral_gives_eight_distinct_transforms_and_crop_is_paired():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    variants = {dihedral(image, mode).tobytes() for mode in range(8)}
    assert len(variants) == 8
    rng = np.random.default_rng(0)
    target = np.random.default_rng(1).random((20, 30, 3), dtype=np.float32)
    a, b = paired_crop([target, 1 - target], 8, rng)
    assert a.shape == (8, 8, 3) and np.allclose(b, 1 - a)


def test_crop_pads_small_images_by_mirroring():
    image = np.arange(6, dtype=np.float32).reshape(2, 3, 1)
    (crop,) = paired_crop([image], 4, np.random.default_rng(0))
    assert crop.shape == (4, 4, 1)
    assert set(np.unique(crop)) <= set(np.unique(image))


def test_noise_levels_and_clipping():
    rng = np.random.default_rng(0)
    clean = np.full((64, 64, 3), 0.5, np.float32)
    noisy = add_noise(clean, NoiseConfig(sigma=25), rng)
    assert noisy.dtype == np.float32
    assert abs(float((noisy - clean).std()) - 25 / 255) < 0.003
    extreme = add_noise(np.ones((32, 32, 1), np.float32), NoiseConfig(sigma=50, clip=True), rng)
    assert extreme.max() <= 1.0
    assert add_noise(np.ones((32, 32, 1), np.float32), NoiseConfig(sigma=50), rng).max() > 1.0
    sigmas = [NoiseConfig(sigma_range=(0, 50)).draw_sigma(rng) for _ in range(200)]
    assert 0 <= min(sigmas) and max(sigmas) <= 50 / 255 and np.std(sigmas) > 0.03
    with pytest.raises(ValueError, match="exactly one"):
        NoiseConfig()


def test_mixup_keeps_pairs_consistent_and_leaves_half_the_batches_unmixed():
    rng = np.random.default_rng(0)
    targets = rng.random((6, 8, 8, 3), dtype=np.float32)
    unmixed = 0
    for _ in range(400):
        inputs, mixed_targets = mixup(1 - targets, targets, rng)
        assert np.allclose(inputs, 1 - mixed_targets, atol=1e-6)
        unmixed += bool(np.array_equal(mixed_targets, targets))
    # Official Mixing_Augment with use_identity: p(identity) = 1/2; 400 draws: std 10.
    assert 160 < unmixed < 240
