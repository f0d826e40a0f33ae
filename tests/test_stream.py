"""Streaming shards into training and validation: epochs, exact and elastic resume, safety, bad samples.

The accounting tests identify every drawn sample: image i of _constant_images holds the value i in
every pixel, so any crop of it tells which sample it is."""

import io
import itertools
import json
import os
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import format1_index, image_bomb
from data_shards import pack as pack_module
from data_shards.codec import encode_png
from data_shards.index import INDEX_NAME, ShardIndex, describe_shard
from data_shards.index import main as index_main
from data_shards.remote import RemoteSettings, ShardReadError
from data_shards.stream import (BadSampleError, Catalog, NoiseConfig, StreamSettings, _ShardReader, build_train_loader,
                                build_val_loader)

SIGMA = NoiseConfig(sigma=25)


def _write_shard(path, samples):
    """samples: list of (key, {extension: bytes}); a hand-made shard for the untrusted-input cases."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _index_shard(path):
    """An index.json next to a hand-made shard, with the records read from it."""
    shard = describe_shard(path)
    ShardIndex(split="train", shards=(shard,), total_samples=shard.samples, inputs=(), channels=3,
               bit_depths=(8,), format="png", min_size=(8, 8), median_size=(8, 8), max_size=(8, 8),
               source_images=shard.samples, tile=None, stride=None, command="test", version="test",
               ).save(path.parent)
    return path.parent


def _constant_images(folder, count, size=12):
    """Image i is filled with the value i, so every crop of it tells which sample it came from."""
    folder.mkdir(parents=True)
    for i in range(count):
        np.save(folder / f"s{i:03d}.npy", np.full((size, size, 1), i, np.uint8))


def _pack(src, out, *extra):
    assert pack_module.main([str(src), "--out", str(out), "--no-progress", *map(str, extra)]) == 0
    return out / "train"


def _ids(batch):
    return [int(v) for v in torch.round(batch["target"][:, 0, 0, 0] * 255)]


def _settings(**change):
    return StreamSettings(**({"patch": 8, "batch": 2, "num_workers": 0, "noise": SIGMA} | change))


def _draw(source, steps, world_size=1, **change):
    """The global sequence of `steps` global batches, as per-position (id, input, target), by simulating
    each rank with its own stream: global batch k is rank 0's k-th batch, then rank 1's, ..."""
    streams = [iter(build_train_loader(source, _settings(rank=r, world_size=world_size, **change)))
               for r in range(world_size)]
    drawn, next_positions = [], set()
    for _ in range(steps):
        for stream in streams:
            batch = next(stream)
            next_positions.add(int(batch["next_position"]))
            drawn += [(i, x, y) for i, x, y in zip(_ids(batch), batch["input"], batch["target"], strict=True)]
    assert len(next_positions) == steps  # every rank agrees where each global batch ends
    return drawn, max(next_positions)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "src").mkdir()
    for i in range(6):
        np.save(root / "src" / f"p{i}.npy", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    return _pack(root / "src", root / "out", "--format", "png", "--shard-samples", 2)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    """23 constant images in shards of 5, 5, 5, 5 and 3 samples."""
    root = tmp_path_factory.mktemp("uneven")
    _constant_images(root / "src", 23)
    source = _pack(root / "src", root / "out", "--format", "npy", "--shard-samples", 5)
    assert [s.samples for s in ShardIndex.load(source).shards] == [5, 5, 5, 5, 3]
    return source


@pytest.mark.parametrize("workers", [0, 2])
def test_identical_settings_give_identical_batches(photos, workers):
    def first(**change):
        settings = _settings(**({"patch": 16, "batch": 4, "seed": 7, "num_workers": workers, "mixup": True} | change))
        return list(itertools.islice(iter(build_train_loader(photos, settings)), 3))

    a, b = first(), first()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["target"], y["target"])
    for change in ({"seed": 8}, {"start": 1}):
        assert not torch.equal(first(**change)[0]["target"], a[0]["target"]), change


def test_batches_have_the_stage_shape_and_range_forever(photos):
    for patch, batch_size in ((16, 6), (40, 3), (64, 2)):  # 64 > image: mirror padding
        settings = _settings(patch=patch, batch=batch_size, noise=NoiseConfig(sigma_range=(0, 50), clip=True))
        batches = list(itertools.islice(iter(build_train_loader(photos, settings)), 10))  # many epochs
        for batch in batches:
            assert batch["input"].shape == batch["target"].shape == (batch_size, 3, patch, patch)
            assert batch["input"].dtype == batch["target"].dtype == torch.float32
            assert 0 <= batch["input"].min() and batch["input"].max() <= 1
            assert batch["skipped"].dtype == torch.int64 and int(batch["skipped"]) == 0
        assert int(batches[-1]["next_position"]) == 10 * batch_size
        assert int(batches[-1]["epoch"]) == (10 * batch_size - 1) // 6


def test_noise_is_added_after_crop_at_the_requested_level(photos):
    batch = next(iter(build_train_loader(photos, _settings(patch=32, batch=6))))
    residual = batch["input"] - batch["target"]
    assert abs(float(residual.std()) - 25 / 255) < 0.003
    assert batch["input"].min() < 0  # the paper does not clip


@pytest.mark.parametrize("world_size,workers,batch", [(1, 0, 4), (1, 3, 2), (2, 2, 3), (3, 1, 2), (4, 3, 1)])
def test_every_sample_once_per_epoch_with_unequal_shards(uneven, world_size, workers, batch):
    epochs = 3
    steps = -(-epochs * 23 // (world_size * batch))
    drawn, _ = _draw(uneven, steps, world_size, num_workers=workers, batch=batch)
    ids = [i for i, _, _ in drawn]
    for epoch in range(epochs):
        assert sorted(ids[epoch * 23:(epoch + 1) * 23]) == list(range(23))
    assert ids[:23] != ids[23:46]  # a new order each epoch


def test_mid_epoch_resumption_continues_with_the_same_samples(uneven):
    """Uninterrupted vs stopped at random points and resumed from next_position: same ids, same order,
    same crops, flips, noise and mixup."""
    settings = {"batch": 3, "num_workers": 2, "mixup": True}
    whole, _ = _draw(uneven, 20, **settings)
    rng = np.random.default_rng(0)
    for _ in range(3):
        stops = sorted(rng.choice(np.arange(1, 20), size=2, replace=False))
        pieces, start = [], 0
        for steps in np.diff([0, *stops, 20]):
            piece, start = _draw(uneven, int(steps), start=start, **settings)
            pieces += piece
        assert [i for i, _, _ in pieces] == [i for i, _, _ in whole]
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(pieces, whole, strict=True))


@pytest.mark.parametrize("before,after", [(4, 2), (2, 3)])
def test_elastic_resume_sees_the_rest_of_the_epoch_exactly_once(uneven, before, after):
    first, position = _draw(uneven, 2, world_size=before, num_workers=1)  # 2 * before * 2 of 23 samples
    rest, end = _draw(uneven, -(-(23 - position) // (after * 2)), world_size=after, num_workers=2, start=position)
    epoch = [i for i, _, _ in first + rest][:23]
    assert sorted(epoch) == list(range(23))
    # Each position keeps its sample's augmentation whatever the topology.
    whole, _ = _draw(uneven, -(-end // 2), world_size=1, num_workers=0)
    for (i, x, y), (j, u, v) in zip(first + rest, whole):
        assert i == j and torch.equal(x, u) and torch.equal(y, v)


def test_data_smaller_than_a_global_batch_is_refused(uneven):
    with pytest.raises(ValueError, match=r"23 samples cannot fill one global batch of 24 \(4 process\(es\) x batch 6\)"):
        build_train_loader(uneven, _settings(batch=6, world_size=4))


def test_shuffle_mixes_the_tiles_of_many_images(tmp_path):
    """A dual-pixel-style 16-bit tiled pack (24 tiles per image): distinct source images per batch of 8."""
    folder = tmp_path / "src"
    folder.mkdir()
    for i in range(60):
        np.save(folder / f"s{i:03d}.npy", np.full((40, 56, 1), i * 257, np.uint16))
    source = _pack(folder, tmp_path / "out", "--format", "npy", "--tile", 16, "--stride", 8,
                   "--shard-samples", 100)
    index = ShardIndex.load(source)
    assert index.total_samples == 60 * 24 and index.bit_depths == (16,)
    loader = build_train_loader(source, _settings(batch=8, num_workers=2))
    batches = list(itertools.islice(iter(loader), index.total_samples // 8))
    distinct = [len(set(_ids(batch))) for batch in batches]
    assert np.mean(distinct) >= 7.2  # a uniform permutation gives 8 * (1 - 7/(2 * 1439) * 23) ~ 7.55
    # The pack alone already spreads an image's tiles: read in stored order, 8 neighbours are mixed too.
    stored = [int(item["target"][0, 0, 0, 0] * 65535) // 257 for item in build_val_loader(source, noise=SIGMA)]
    assert np.mean([len(set(stored[i:i + 8])) for i in range(0, len(stored), 8)]) >= 6


def test_an_index_without_sample_records_is_refused_with_the_fix(uneven, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    for shard in ShardIndex.load(uneven).shards:
        (old / shard.name).write_bytes((uneven / shard.name).read_bytes())
    data = format1_index(uneven, records=False)
    (old / INDEX_NAME).write_text(json.dumps(data))
    fix = f"run `python -m data_shards.index {old}` once"
    with pytest.raises(ValueError, match=fix):
        build_train_loader(old, _settings())
    with pytest.raises(ValueError, match=fix):
        build_val_loader(old, noise=SIGMA)
    assert index_main([str(old)]) == 0
    assert ShardIndex.load(old).shards == ShardIndex.load(uneven).shards
    assert _draw(old, 3)[0][0][0] == _draw(uneven, 3)[0][0][0]
    (old / INDEX_NAME).write_text(json.dumps(data))
    first = ShardIndex.load(old).shards[0].name
    changed = bytearray((old / first).read_bytes())
    changed[len(changed) // 3] ^= 0xFF  # since it was packed
    (old / first).write_bytes(bytes(changed))
    assert index_main([str(old)]) == 2  # the fix records only shards that still match their sha256


@pytest.mark.parametrize("growth", [0, 4096], ids=["same-size", "larger"])
def test_a_swapped_shard_is_refused_sample_by_sample(tmp_path, growth):
    """A shard replaced by one of another data set packed alike: same keys, same sizes, every sample a
    valid one at the index's byte ranges; only the digests tell. Training and validation skip and name
    each sample (the rest of the data trains on), strict mode stops."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    _constant_images(ours / "src", 6)
    (theirs / "src").mkdir(parents=True)
    for i in range(6):
        np.save(theirs / "src" / f"s{i:03d}.npy", np.full((12, 12, 1), 200 + i, np.uint8))
    source = _pack(ours / "src", ours / "out", "--format", "npy", "--shard-samples", 3)
    other = _pack(theirs / "src", theirs / "out", "--format", "npy", "--shard-samples", 3)
    swapped = ShardIndex.load(source).shards[1]
    (source / swapped.name).write_bytes((other / swapped.name).read_bytes() + b"\0" * growth)
    with pytest.warns(UserWarning) as caught:
        batches = list(itertools.islice(iter(build_train_loader(source, _settings(batch=3))), 4))  # 2 epochs
        val = build_val_loader(source, noise=SIGMA)
        kept = [item["key"] for item in val]
    drawn = [i for batch in batches for i in _ids(batch)]
    # Each of the 3 swapped samples is drawn twice in 2 epochs, and some replacements are swapped ones too.
    assert sum(int(b["skipped"]) for b in batches) >= 2 * 3 and max(drawn) < 6  # nothing of theirs trained
    assert val.skipped == 3 and not set(kept) & set(swapped.keys)
    for key in swapped.keys:
        assert any(f"{swapped.name} bytes" in str(w.message) and f"key {key}: ValueError: these bytes are not the "
                   f"sample the index recorded (digest differs; they hold key {key})" in str(w.message) for w in caught)
    with pytest.raises(BadSampleError, match=f"{swapped.name} bytes .* these bytes are not the sample"):
        list(itertools.islice(iter(build_train_loader(source, _settings(batch=3, strict=True))), 2))


def test_a_read_through_an_open_handle_is_bounds_checked(uneven):
    """The reader keeps a shard open after a sample; a later range of it must meet the bounds that opening
    checks, before anything is read (ShardIndex.load refuses such ranges; an index built in code is not
    loaded)."""
    index = ShardIndex.load(uneven)
    reader = _ShardReader(Catalog.from_index(index, index.shard_urls, str(uneven)), RemoteSettings())
    start, end = index.shards[0].offsets[:2]
    assert len(reader.read(0, start, end - start)) == end - start and reader.handles  # kept open
    with pytest.raises(ShardReadError, match=r"bytes 2048\.\.1000000002048 are past the end of the shard"):
        reader.read(0, 2048, 10**12)  # would allocate a terabyte
    reader.close()


def test_a_key_from_an_unchecked_shard_is_shown_escaped(tmp_path):
    """Without an index the keys come straight from the tar: a warning naming one stays one printable line."""
    _write_shard(tmp_path / "s.tar", [("evil\x1b[2J\nfake", {"target.png": b"not a png"})])
    with pytest.warns(UserWarning) as caught:
        assert list(build_val_loader(str(tmp_path / "s.tar"), noise=SIGMA)) == []
    message = str(caught[0].message)
    assert "key evil\\x1b[2J\\nfake: " in message and message.isprintable()


def test_a_kept_handle_that_cannot_seek_is_closed_not_leaked(uneven):
    index = ShardIndex.load(uneven)
    reader = _ShardReader(Catalog.from_index(index, index.shard_urls, str(uneven)), RemoteSettings())
    start, end = index.shards[0].offsets[:2]
    reader.read(0, start, end - start)

    class Stale:  # a kept handle whose file went away (a stale NFS handle, a dropped mount)
        closed = False

        def seek(self, _position):
            raise OSError(116, "Stale file handle")

        def close(self):
            self.closed = True

    reader.handles[0].close()
    reader.handles[0] = stale = Stale()
    with pytest.raises(OSError, match="Stale file handle"):
        reader.read(0, start, end - start)
    assert stale.closed and not reader.handles
    reader.close()


def test_an_index_that_does_not_match_its_shard_is_named(uneven, tmp_path):
    """A shard replaced after packing (here: one member longer) puts samples at other byte offsets."""
    split = tmp_path / "split"
    split.mkdir()
    for path in uneven.iterdir():
        (split / path.name).write_bytes(path.read_bytes())
    first = ShardIndex.load(split).shards[0].name
    with tarfile.open(uneven / first) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    members[0] = (members[0][0], members[0][1] + b"\0" * 600)
    with tarfile.open(split / first, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match=f"{first} bytes \\d+:\\d+, key s\\d+: ValueError: these bytes are not the sample "
                                         "the index recorded"):
        batches = list(itertools.islice(iter(build_train_loader(split, _settings(batch=4))), 6))
    assert sum(int(b["skipped"]) for b in batches) > 0


def test_val_loader_splits_ranks_and_seeds_noise_per_key(photos):
    whole = {item["key"]: item for item in build_val_loader(photos, noise=SIGMA)}
    assert len(whole) == 6 and all(item["input"].shape == (1, 3, 48, 40) for item in whole.values())
    parts = [list(build_val_loader(photos, rank=r, world_size=4, noise=SIGMA)) for r in range(4)]
    keys = [item["key"] for part in parts for item in part]
    assert sorted(keys) == sorted(whole) and len(keys) == len(set(keys))
    for part in parts:
        for item in part:
            assert torch.equal(item["input"], whole[item["key"]]["input"])
    assert [len(build_val_loader(photos, rank=r, world_size=4, noise=SIGMA)) for r in range(4)] == [2, 2, 1, 1]
    limited = list(build_val_loader(photos, noise=SIGMA, max_images=4))
    assert len(limited) == 4


def test_pipe_and_brace_sources(photos):
    pattern = f"pipe:cat {photos}/train-{{000000..000002}}.tar"
    loader = build_train_loader(pattern, _settings(patch=16), index=photos / "index.json")
    piped = list(itertools.islice(iter(loader), 4))
    direct = list(itertools.islice(iter(build_train_loader(photos, _settings(patch=16))), 4))
    assert all(torch.equal(a["input"], b["input"]) for a, b in zip(piped, direct, strict=True))
    val = list(build_val_loader(f"{photos}/train-{{000000..000002}}.tar", noise=SIGMA))
    assert len(val) == 6
    with pytest.raises(ValueError, match="needs the split's index.json"):
        build_train_loader(pattern, _settings())


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    target = encode_png(np.zeros((8, 8, 3), np.uint8))
    evil = pickle.dumps(Payload())
    _write_shard(tmp_path / "evil.tar", [(f"k{i}", {"target.png": target, "pyd": evil, "pickle": evil,
                                                     "input.pyd": evil}) for i in range(4)])
    pickle.loads(evil)  # the payload works when unpickled ...
    assert marker.exists()
    marker.rmdir()
    list(itertools.islice(iter(build_train_loader(_index_shard(tmp_path / "evil.tar"), _settings())), 3))
    list(build_val_loader(str(tmp_path / "evil.tar"), noise=SIGMA))
    assert not marker.exists()  # ... and the stream never did


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    good = encode_png(np.full((8, 8, 3), 9, np.uint8))
    samples = [(f"k{i}", {"target.png": good}) for i in range(6)]
    samples[2] = ("broken", {"target.png": good[:40]})
    samples[4] = ("lonely", {"json": b"{}"})
    _write_shard(tmp_path / "bad.tar", samples)
    source = _index_shard(tmp_path / "bad.tar")
    with pytest.warns(UserWarning, match=r"bad\.tar, key broken"):
        batches = list(itertools.islice(iter(build_train_loader(source, _settings(batch=3))), 4))  # 2 epochs
    assert sum(int(b["skipped"]) for b in batches) == 4  # 2 bad samples, drawn once per epoch
    assert all(b["target"].shape[0] == 3 for b in batches)
    with pytest.raises(BadSampleError, match="broken|lonely"):
        list(itertools.islice(iter(build_train_loader(source, _settings(strict=True))), 3))
    with pytest.warns(UserWarning, match="key lonely.*no target.png"):
        val = build_val_loader(str(tmp_path / "bad.tar"), noise=SIGMA)
        assert len(list(val)) == 4 and val.skipped == 2
    with pytest.raises(BadSampleError, match="broken"):
        list(build_val_loader(str(tmp_path / "bad.tar"), noise=SIGMA, strict=True))


def test_an_image_bomb_in_a_shard_is_a_named_bad_sample(tmp_path):
    """Pack never stores one, but shards can come from elsewhere: refused from the header, nothing decoded."""
    good = encode_png(np.full((8, 8, 3), 9, np.uint8))
    bombs = {suffix: image_bomb(tmp_path / f"bomb{suffix}", 12000, 12000, bits=16).read_bytes()
             for suffix in (".png", ".npy")}
    samples = [("k0", {"target.png": good}), ("png_bomb", {"target.png": bombs[".png"]}),
               ("npy_bomb", {"target.npy": bombs[".npy"]}), ("k3", {"target.png": good})]
    _write_shard(tmp_path / "bombs.tar", samples)
    with pytest.warns(UserWarning) as caught:
        val = build_val_loader(str(tmp_path / "bombs.tar"), noise=SIGMA)
        assert [item["key"] for item in val] == ["k0", "k3"] and val.skipped == 2
    warned = " ".join(str(w.message) for w in caught)
    assert "bombs.tar, key png_bomb: PixelLimitError: 12000x12000 is 144,000,000 pixels" in warned
    assert "key npy_bomb: PixelLimitError" in warned


@pytest.mark.timeout(60)
def test_truncated_shard_does_not_hang(tmp_path):
    good = encode_png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    _write_shard(tmp_path / "t.tar", [(f"k{i}", {"target.png": good}) for i in range(8)])
    source = _index_shard(tmp_path / "t.tar")
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="t.tar"):
        val = list(build_val_loader(str(tmp_path / "t.tar"), noise=SIGMA))
        assert 0 < len(val) < 8
        loader = build_train_loader(source, _settings(num_workers=2))
        batches = list(itertools.islice(iter(loader), 5))
        assert len(batches) == 5 and sum(int(b["skipped"]) for b in batches) > 0
    with pytest.raises(BadSampleError, match="t.tar"):
        list(build_val_loader(str(tmp_path / "t.tar"), noise=SIGMA, strict=True))


@pytest.mark.timeout(60)
def test_all_bad_data_fails_instead_of_hanging(tmp_path):
    _write_shard(tmp_path / "junk.tar", [(f"k{i}", {"target.png": b"junk"}) for i in range(3)])
    loader = build_train_loader(_index_shard(tmp_path / "junk.tar"), _settings())
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def test_noise_must_match_the_data(tmp_path, photos):
    with pytest.raises(ValueError, match="clean images only"):
        build_train_loader(photos, _settings(noise=None))
    rng = np.random.default_rng(0)
    for folder in ("gt", "in"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "a.npy", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert pack_module.main(["--input", str(tmp_path / "in"), "--target", str(tmp_path / "gt"),
                             "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="degraded inputs"):
        build_val_loader(tmp_path / "out" / "train", noise=SIGMA)


def _rank_main(rank, port, source, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loader = build_train_loader(source, _settings(rank=dist.get_rank(), world_size=2, num_workers=2))
    ids = torch.zeros(256, dtype=torch.int64)
    for batch in itertools.islice(iter(loader), 25):  # 100 positions: 8 1/3 epochs of 12 samples
        for i in _ids(batch):
            ids[i] += 1
        dist.all_reduce(torch.ones(1))  # every step is collective: a rank that ran out would hang here
    dist.all_reduce(ids)
    torch.save(ids, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort a process at exit.
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_processes_share_each_epoch(tmp_path):
    _constant_images(tmp_path / "src", 12)
    source = _pack(tmp_path / "src", tmp_path / "out", "--format", "npy")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(source), str(tmp_path)), nprocs=2, join=True)
    counts = torch.load(tmp_path / "rank0.pt")[:12]
    assert int(counts.sum()) == 100 and set(counts.tolist()) <= {8, 9}  # 8 whole epochs and a third
