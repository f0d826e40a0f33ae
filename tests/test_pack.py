"""restormer-pack and restormer-verify: layouts, bit-exactness, determinism and every bad-input case."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import format1_index, image_bomb
from data_shards import pack as pack_module
from data_shards import verify
from data_shards.index import ShardIndex, describe_shard, reindex
from data_shards.stream import NoiseConfig, StreamSettings, build_train_loader, build_val_loader


def _save(path, image):
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".tif":
        tifffile.imwrite(path, image)
    else:
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(path)


def _photos(folder, count=4, size=(40, 56), channels=3, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    images = {}
    for i in range(count):
        image = rng.integers(0, np.iinfo(dtype).max + 1, (*size, channels), dtype=np.int64).astype(dtype)
        name = f"img{i}.png" if dtype == np.uint8 or channels == 1 else f"img{i}.tif"
        _save(folder / name, image)
        images[f"img{i}"] = image
    return images


def _run(*argv):
    return pack_module.main([*map(str, argv), "--no-progress"])


@pytest.mark.parametrize("fmt", ["png", "npy"])
@pytest.mark.parametrize("dtype,channels", [(np.uint8, 1), (np.uint8, 3), (np.uint16, 1), (np.uint16, 3)])
def test_pixels_survive_pack_and_stream_unchanged(tmp_path, fmt, dtype, channels):
    images = _photos(tmp_path / "src", count=2, channels=channels, dtype=dtype)
    assert _run(tmp_path / "src", "--out", tmp_path / "out", "--format", fmt) == 0
    index = ShardIndex.load(tmp_path / "out" / "train")
    assert index.channels == channels and index.bit_depths == (8 * np.dtype(dtype).itemsize,)
    scale = np.float32(np.iinfo(dtype).max)
    seen = 0
    for item in build_val_loader(tmp_path / "out" / "train", noise=NoiseConfig(sigma=25)):
        expected = images[item["key"]].astype(np.float32) / scale
        got = item["target"][0].permute(1, 2, 0).numpy()
        assert got.dtype == np.float32 and np.array_equal(got, expected)
        assert np.array_equal(np.round(got * scale).astype(dtype), images[item["key"]])
        seen += 1
    assert seen == 2
    # The training path too: a full-size patch without augmentation is the stored image itself.
    loader = build_train_loader(tmp_path / "out" / "train", StreamSettings(
        patch=40, batch=1, num_workers=0, noise=NoiseConfig(sigma=0), augment=False))
    batch = next(iter(loader))
    target = batch["target"][0].permute(1, 2, 0).numpy()
    assert any(np.array_equal(target, img.astype(np.float32)[:, x:x + 40] / scale)
               for img in images.values() for x in range(17))


def test_paired_folders_named_inputs_and_tiling(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "sub/b.c"):  # a dot in the name must not leak into the webdataset key
        target = rng.integers(0, 256, (70, 50, 3), dtype=np.uint8)
        _save(tmp_path / "gt" / f"{name}.png", target)
        _save(tmp_path / "left" / f"{name}.png", 255 - target)
        _save(tmp_path / "right" / f"{name}.png", target // 2)
    code = _run("--input", f"left={tmp_path / 'left'}", "--input", f"right={tmp_path / 'right'}",
                "--target", tmp_path / "gt", "--out", tmp_path / "out", "--tile", 32, "--stride", 24)
    assert code == 0
    index = ShardIndex.load(tmp_path / "out" / "train")
    assert index.inputs == ("input_left", "input_right") and index.tile == 32
    # rows at 0, 24, 38; columns at 0, 18: six tiles per image.
    assert index.total_samples == 12 and index.max_size == (32, 32)
    with tarfile.open(tmp_path / "out" / "train" / index.shards[0].name) as tar:
        names = tar.getnames()
    assert "sub/b_c-tile24x18.input_left.png" in names and "a-tile38x0.json" in names
    loader = build_train_loader(tmp_path / "out" / "train", StreamSettings(patch=16, batch=4, num_workers=0))
    batch = next(iter(loader))
    assert batch["input"].shape == (4, 6, 16, 16) and batch["target"].shape == (4, 3, 16, 16)
    # left = 1 - target and right = target // 2 survive crop + flips/rotations in this channel order.
    assert torch_allclose(batch["input"][:, :3], 1 - batch["target"])
    half = np.floor(np.round(batch["target"].numpy() * 255) / 2) / 255
    assert torch_allclose(batch["input"][:, 3:], half)


def torch_allclose(a, b):
    return np.allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_manifest_with_split_column(tmp_path):
    _photos(tmp_path / "data", count=5)
    rows = ["target,split"] + [f"data/img{i}.png,{'val' if i == 3 else 'train'}" for i in range(5)]
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    assert _run("--manifest", tmp_path / "m.csv", "--out", tmp_path / "out", "--tile", 16) == 0
    val = ShardIndex.load(tmp_path / "out" / "val")
    train = ShardIndex.load(tmp_path / "out" / "train")
    assert val.total_samples == 1 and val.tile is None and val.max_size == (40, 56)
    assert train.source_images == 4 and train.max_size == (16, 16)


def test_val_fraction_holds_out_whole_images(tmp_path):
    _photos(tmp_path / "src", count=10)
    assert _run(tmp_path / "src", "--out", tmp_path / "out", "--val-fraction", 0.2, "--seed", 3, "--tile", 20) == 0
    val_keys = {item["key"] for item in build_val_loader(tmp_path / "out" / "val", noise=NoiseConfig(sigma=5))}
    train = build_val_loader(tmp_path / "out" / "train", noise=NoiseConfig(sigma=5))
    train_sources = {item["key"].split("-tile")[0] for item in train}
    assert len(val_keys) == 2 and not val_keys & train_sources and len(train_sources) == 8


def test_shards_are_deterministic_across_worker_counts_and_limits_hold(tmp_path):
    _photos(tmp_path / "src", count=7)
    for out, workers in (("one", 1), ("two", 2)):
        assert _run(tmp_path / "src", "--out", tmp_path / out, "--workers", workers,
                    "--shard-samples", 3, "--tile", 20) == 0
    one, two = (ShardIndex.load(tmp_path / out / "train") for out in ("one", "two"))
    assert len(one.shards) > 1 and all(s.samples <= 3 for s in one.shards)
    assert [s.sha256 for s in one.shards] == [s.sha256 for s in two.shards]
    for shard in one.shards:
        assert (tmp_path / "one/train" / shard.name).read_bytes() == (tmp_path / "two/train" / shard.name).read_bytes()
    assert _run(tmp_path / "src", "--out", tmp_path / "small", "--shard-mb", 0.01) == 0
    small = ShardIndex.load(tmp_path / "small" / "train")
    assert len(small.shards) == 7  # each ~7 KB sample exceeds half the 10 KB limit


def test_index_offsets_locate_every_sample_and_tiles_are_spread(tmp_path):
    _photos(tmp_path / "src", count=6)
    assert _run(tmp_path / "src", "--out", tmp_path / "out", "--shard-samples", 10, "--tile", 20) == 0
    folder = tmp_path / "out" / "train"
    index = ShardIndex.load(folder)
    shards_of: dict[str, set[int]] = {}
    stored = []
    for number, shard in enumerate(index.shards):
        assert shard == describe_shard(folder / shard.name) and len(shard.offsets) == shard.samples + 1
        data = (folder / shard.name).read_bytes()
        for start, end in zip(shard.offsets, shard.offsets[1:]):
            with tarfile.open(fileobj=io.BytesIO(data[start:end])) as tar:  # each range is a whole sample
                (key,) = {name.split(".")[0] for name in tar.getnames()}
            source = key.split("-tile")[0]
            shards_of.setdefault(source, set()).add(number)
            stored.append(source)
    assert index.total_samples == 6 * 6 and len(index.shards) == 4
    spread = [len(shards) for shards in shards_of.values()]
    assert min(spread) >= 2 and np.mean(spread) >= 2.5, spread  # an image's 6 tiles over several shards
    assert np.mean([len(set(stored[i:i + 6])) for i in range(0, 36, 6)]) >= 3.5
    together = tmp_path / "together"
    assert _run(tmp_path / "src", "--out", together, "--shard-samples", 10, "--tile", 20, "--spread-mb", 0) == 0
    names = [n.split("-tile")[0] for s in ShardIndex.load(together / "train").shards
             for n in tarfile.open(together / "train" / s.name).getnames() if n.endswith(".json")]
    assert [len(set(names[i:i + 6])) for i in range(0, 36, 6)] == [1] * 6  # without spreading: one image


def test_bad_samples_are_skipped_and_listed(tmp_path, capsys):
    _photos(tmp_path / "gt", count=3)
    _photos(tmp_path / "in", count=3)
    (tmp_path / "gt" / "img1.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    _save(tmp_path / "in" / "img2.png", np.zeros((10, 10, 3), np.uint8))  # size differs from target
    _save(tmp_path / "in" / "orphan.png", np.zeros((10, 10, 3), np.uint8))  # no target
    (tmp_path / "gt" / "notes.txt").write_text("not an image")
    rgba = np.zeros((40, 56, 4), np.uint8)
    _save(tmp_path / "gt" / "img3.png", rgba)
    _save(tmp_path / "in" / "img3.png", rgba)
    assert _run("--input", tmp_path / "in", "--target", tmp_path / "gt", "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "skipped 3:" in out
    assert "img1.png: cannot decode" in out
    assert "img2.png" in out and "input is 10x10x3 but the target is 56x40x3" in out
    assert "orphan.png: input has no target" in out
    assert "alpha channel dropped" in out and "ignored 1 non-image files" in out
    assert ShardIndex.load(tmp_path / "out" / "train").total_samples == 2


def test_strict_stops_at_first_bad_sample_and_leaves_no_whole_looking_shard(tmp_path, capsys):
    _photos(tmp_path / "src", count=6)
    (tmp_path / "src" / "img4.png").write_bytes(b"garbage")
    code = _run(tmp_path / "src", "--out", tmp_path / "out", "--strict", "--shard-samples", 1)
    assert code == 2
    assert "img4.png: cannot decode" in capsys.readouterr().err
    folder = tmp_path / "out" / "train"
    assert not (folder / "index.json").exists()
    assert not list(folder.glob("*.tmp"))
    for shard in folder.glob("*.tar"):  # finished shards are complete tars, never truncated ones
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 2


def test_images_over_the_pixel_limit_are_skipped_and_listed_or_stop_strict(tmp_path, capsys):
    _photos(tmp_path / "src", count=2)
    image_bomb(tmp_path / "src" / "tiff_bomb.tif", 14000, 14000, bits=16)  # issue 28: 196 MP in 230 bytes
    image_bomb(tmp_path / "src" / "png_bomb.png", 12000, 12000, bits=16)
    assert _run(tmp_path / "src", "--out", tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert "skipped 2:" in out and ShardIndex.load(tmp_path / "out" / "train").total_samples == 2
    assert "tiff_bomb.tif: 14000x14000 is 196,000,000 pixels, over the limit of 67,108,864 (--max-pixels" in out
    assert "png_bomb.png: 12000x12000 is 144,000,000 pixels" in out
    assert _run(tmp_path / "src", "--out", tmp_path / "strict", "--strict") == 2
    assert "_bomb." in capsys.readouterr().err


def test_max_pixels_reads_larger_images_that_tiles_keep_within_the_stream_limit(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(pack_module, "MAX_PIXELS", 40 * 40)  # the photos are 40x56
    _photos(tmp_path / "src", count=2)
    assert _run(tmp_path / "src", "--out", tmp_path / "o1") == 0
    assert "skipped 2:" in capsys.readouterr().out
    assert _run(tmp_path / "src", "--out", tmp_path / "o2", "--max-pixels", 3000) == 0
    assert "stored whole: 56x40 is 2,240 pixels, over the limit of 1,600 that the training stream decodes; " \
           "cut it with --tile" in capsys.readouterr().out
    assert _run(tmp_path / "src", "--out", tmp_path / "o3", "--max-pixels", 3000, "--tile", 32) == 0
    assert ShardIndex.load(tmp_path / "o3" / "train").max_size == (32, 32)


def test_samples_an_index_would_refuse_are_skipped_and_listed(tmp_path, capsys, monkeypatch):
    """A key longer than an index admits, or a sample larger than an index range may be: skipped and
    listed at pack time, never packed into an index that the stream then refuses."""
    _photos(tmp_path / "src", count=2)
    deep = f"{'d' * 200}/{'e' * 60}/img9"
    _save(tmp_path / "src" / f"{deep}.png", np.zeros((40, 56, 3), np.uint8))
    assert _run(tmp_path / "src", "--out", tmp_path / "long") == 0
    out = capsys.readouterr().out
    assert "skipped 1:" in out and f"img9.png: its key is {len(deep)} characters long, over the index's 255" in out
    _photos(tmp_path / "sizes", count=1, size=(8, 8))
    _save(tmp_path / "sizes" / "big.png", np.random.default_rng(0).integers(0, 256, (40, 56, 3), dtype=np.uint8))
    monkeypatch.setattr(pack_module, "MAX_SAMPLE_BYTES", 6000)  # an 8x8 sample takes 4096 bytes, the 40x56 one more
    assert _run(tmp_path / "sizes", "--out", tmp_path / "sizes_out") == 0
    out = capsys.readouterr().out
    assert "skipped 1:" in out and re.search(r"big.png: a sample of [\d,]+ bytes is over the 6,000 that the index", out)
    assert ShardIndex.load(tmp_path / "sizes_out" / "train").total_samples == 1


def test_the_command_in_the_index_is_printable(tmp_path):
    """The index records the pack command; a path with a newline in it is recorded escaped."""
    _photos(tmp_path / "src", count=1)
    assert _run(tmp_path / "src", "--out", tmp_path / "out\nsecond line") == 0
    command = ShardIndex.load(tmp_path / "out\nsecond line" / "train").command
    assert command.isprintable() and "out\\nsecond line" in command


def test_refuses_bad_output_and_empty_input(tmp_path, capsys):
    _photos(tmp_path / "src", count=2)
    (tmp_path / "empty").mkdir()
    assert _run(tmp_path / "empty", "--out", tmp_path / "o1") == 2
    assert "no images found" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert _run(tmp_path / "src", "--out", tmp_path / "afile" / "sub") == 2
    assert "cannot write to --out" in capsys.readouterr().err
    assert _run(tmp_path / "src", "--out", tmp_path / "o2") == 0
    assert _run(tmp_path / "src", "--out", tmp_path / "o2") == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    (tmp_path / "o2" / "keep.txt").write_text("user file")
    assert _run(tmp_path / "src", "--out", tmp_path / "o2", "--overwrite") == 0
    assert (tmp_path / "o2" / "keep.txt").exists()
    assert ShardIndex.load(tmp_path / "o2" / "train").total_samples == 2


def test_mixed_gray_and_rgb_needs_an_explicit_colour_choice(tmp_path, capsys):
    _photos(tmp_path / "src", count=2, channels=3)
    _save(tmp_path / "src" / "gray.png", np.zeros((40, 56, 1), np.uint8))
    assert _run(tmp_path / "src", "--out", tmp_path / "out") == 2
    assert "mix gray and colour" in capsys.readouterr().err
    assert _run(tmp_path / "src", "--out", tmp_path / "out", "--color", "rgb") == 0
    assert ShardIndex.load(tmp_path / "out" / "train").channels == 3


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        pack_module.main(["--help"])
    text = capsys.readouterr().out
    for option in ("--input", "--target", "--manifest", "--out", "--overwrite", "--format", "--png-level",
                   "--color", "--tile", "--stride", "--shard-samples", "--shard-mb", "--val-fraction",
                   "--seed", "--workers", "--strict", "--no-progress"):
        assert option in text


def test_verify_accepts_good_shards_and_names_a_truncated_or_corrupted_one(tmp_path, capsys):
    _photos(tmp_path / "src", count=4)
    assert _run(tmp_path / "src", "--out", tmp_path / "out", "--val-fraction", 0.25) == 0
    assert verify.main([str(tmp_path / "out")]) == 0
    shard = tmp_path / "out" / "train" / "train-000000.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert verify.main([str(tmp_path / "out" / "train")]) == 1
    report = capsys.readouterr().out
    assert "train-000000.tar" in report and "truncated" in report
    corrupted = bytearray(data)
    corrupted[1600] ^= 0xFF  # inside the first PNG's data
    shard.write_bytes(bytes(corrupted))
    assert verify.main([str(tmp_path / "out" / "train")]) == 1
    report = capsys.readouterr().out
    assert "sha256 differs" in report and "does not decode" in report
    assert re.search(r"train-000000\.tar: key \S+: its bytes differ from the index's digest", report)
    (tmp_path / "out" / "train" / "train-000001.tar.tmp").write_bytes(b"")
    shard.write_bytes(data)
    assert verify.main([str(tmp_path / "out" / "train")]) == 1
    assert "unfinished shard" in capsys.readouterr().out
    (tmp_path / "out" / "train" / "train-000001.tar.tmp").unlink()
    index_file = tmp_path / "out" / "train" / "index.json"
    good_index = index_file.read_text()
    old_index = format1_index(tmp_path / "out" / "train", records=False)  # as packed before the per-sample records
    index_file.write_text(json.dumps(old_index))
    assert verify.main([str(tmp_path / "out" / "train")]) == 1
    assert "python -m data_shards.index" in capsys.readouterr().out
    reindex(tmp_path / "out" / "train")
    assert verify.main([str(tmp_path / "out" / "train")]) == 0
    assert index_file.read_text() == good_index


def test_split_puts_every_sample_into_one_split_and_parquet_manifests_work(tmp_path):
    _photos(tmp_path / "data", count=3)
    assert _run(tmp_path / "data", "--out", tmp_path / "out", "--split", "val", "--tile", 16) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["val"]
    val = ShardIndex.load(tmp_path / "out" / "val")
    assert val.total_samples == 3 and val.tile is None  # a test set stays whole
    import pandas as pd

    pd.DataFrame({"target": [f"data/img{i}.png" for i in range(3)]}).to_parquet(tmp_path / "m.parquet")
    assert _run("--manifest", tmp_path / "m.parquet", "--out", tmp_path / "pq") == 0
    assert ShardIndex.load(tmp_path / "pq" / "train").total_samples == 3
    assert _run(tmp_path / "data", "--out", tmp_path / "bad", "--split", "val", "--val-fraction", 0.5) == 2
