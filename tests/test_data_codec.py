"""Lossless image codecs and the augmentation/degradation primitives of data_shards."""

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_shards.codec import ImageError, decode_npy, decode_png, encode_npy, encode_png, read_image, to_channels
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
