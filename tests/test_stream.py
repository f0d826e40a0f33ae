"""Streaming shards into training and validation: seeding, rank/worker splits, safety, bad samples."""

import io
import itertools
import os
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_shards import pack as pack_module
from data_shards.codec import encode_png
from data_shards.index import ShardIndex
from data_shards.stream import (BadSampleError, NoiseConfig, build_train_loader, build_val_loader, slot_plan)

SIGMA = NoiseConfig(sigma=25)


def _write_shard(path, samples):
    """samples: list of (key, {extension: bytes}); a hand-made shard for the untrusted-input cases."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _constant_images(folder, count, size=12):
    """Image i is filled with the value i, so every crop of it tells which sample it came from."""
    folder.mkdir(parents=True)
    for i in range(count):
        np.save(folder / f"s{i:03d}.npy", np.full((size, size, 1), i, np.uint8))


def _pack(src, out, *extra):
    assert pack_module.main([str(src), "--out", str(out), "--no-progress", *map(str, extra)]) == 0
    return out / "train"


def _ids(batch):
    return {int(v) for v in torch.round(batch["target"][:, 0, 0, 0] * 255)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    (root / "src").mkdir()
    for i in range(6):
        np.save(root / "src" / f"p{i}.npy", rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    return _pack(root / "src", root / "out", "--format", "png", "--shard-samples", 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_identical_arguments_give_identical_batches(photos, workers):
    def first(**change):
        args = dict(patch_size=16, batch_size=4, seed=7, num_workers=workers, noise=SIGMA, mixup=True) | change
        return list(itertools.islice(iter(build_train_loader(photos, **args)), 3))

    a, b = first(), first()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x["input"], y["input"]) and torch.equal(x["target"], y["target"])
    for change in ({"resume_count": 1}, {"stage": 1}, {"seed": 8}, {"rank": 1, "world_size": 2}):
        assert not torch.equal(first(**change)[0]["target"], a[0]["target"]), change


def test_batches_have_the_stage_shape_and_range_forever(photos):
    for patch, batch_size in ((16, 8), (40, 3), (64, 2)):  # 64 > image: mirror padding
        loader = build_train_loader(photos, patch_size=patch, batch_size=batch_size, seed=0, num_workers=0,
                                    noise=NoiseConfig(sigma_range=(0, 50), clip=True))
        batches = list(itertools.islice(iter(loader), 10))  # far more samples than the 6 stored
        for batch in batches:
            assert batch["input"].shape == batch["target"].shape == (batch_size, 3, patch, patch)
            assert batch["input"].dtype == batch["target"].dtype == torch.float32
            assert 0 <= batch["input"].min() and batch["input"].max() <= 1
            assert batch["skipped"].dtype == torch.int64 and int(batch["skipped"]) == 0


def test_noise_is_added_after_crop_at_the_requested_level(photos):
    loader = build_train_loader(photos, patch_size=32, batch_size=16, seed=0, num_workers=0, noise=SIGMA)
    batch = next(iter(loader))
    residual = batch["input"] - batch["target"]
    assert abs(float(residual.std()) - 25 / 255) < 0.003
    assert batch["input"].min() < 0  # the paper does not clip


def test_slot_plan_partitions_every_sample_exactly_once():
    for shards, slots in ((1, 4), (3, 4), (4, 4), (9, 4), (2, 6)):
        owners = {}
        for slot in range(slots):
            for shard, modulus, remainder in slot_plan(shards, slot, slots):
                for position in range(remainder, 60, modulus):
                    assert (shard, position) not in owners
                    owners[(shard, position)] = slot
        assert len(owners) == shards * 60


def test_ranks_and_workers_see_disjoint_never_exhausted_streams_with_one_shard(tmp_path):
    _constant_images(tmp_path / "src", 16)
    source = _pack(tmp_path / "src", tmp_path / "out", "--format", "npy")
    assert len(ShardIndex.load(source).shards) == 1
    seen = []
    for rank in (0, 1):
        loader = build_train_loader(source, patch_size=8, batch_size=2, seed=0, rank=rank, world_size=2,
                                    num_workers=2, noise=SIGMA)
        ids = set().union(*(_ids(b) for b in itertools.islice(iter(loader), 40)))  # 80 draws of 4 samples
        seen.append(ids)
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(16))


def test_more_workers_than_shards(tmp_path):
    _constant_images(tmp_path / "src", 9)
    source = _pack(tmp_path / "src", tmp_path / "out", "--format", "npy")
    loader = build_train_loader(source, patch_size=8, batch_size=3, seed=0, num_workers=3, noise=SIGMA)
    assert set().union(*(_ids(b) for b in itertools.islice(iter(loader), 30))) == set(range(9))


def _rank_main(rank, port, source, out_dir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    loader = build_train_loader(source, patch_size=8, batch_size=2, seed=0, rank=dist.get_rank(),
                                world_size=dist.get_world_size(), num_workers=2, noise=SIGMA)
    ids = torch.zeros(256, dtype=torch.int64)
    for batch in itertools.islice(iter(loader), 25):  # 50 samples each from a 12-sample split
        for i in _ids(batch):
            ids[i] += 1
        dist.all_reduce(torch.ones(1))  # every step is collective: a rank that ran out would hang here
    gathered = [torch.zeros_like(ids) for _ in range(2)]
    dist.all_gather(gathered, ids)
    torch.save(gathered, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # Skip interpreter teardown: gloo's threads can abort a process at exit (see ENVIRONMENT.md).
    os._exit(0)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_gloo_processes_draw_disjoint_endless_streams(tmp_path):
    _constant_images(tmp_path / "src", 12)
    source = _pack(tmp_path / "src", tmp_path / "out", "--format", "npy")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_rank_main, args=(port, str(source), str(tmp_path)), nprocs=2, join=True)
    counts = torch.load(tmp_path / "rank0.pt")
    assert torch.equal(torch.stack(counts), torch.stack(torch.load(tmp_path / "rank1.pt")))
    rank0, rank1 = ({i for i in range(256) if c[i] > 0} for c in counts)
    assert rank0 and rank1 and rank0.isdisjoint(rank1) and rank0 | rank1 == set(range(12))


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
    loader = build_train_loader(pattern, patch_size=16, batch_size=2, seed=0, num_workers=0, noise=SIGMA,
                                index=photos / "index.json")
    assert next(iter(loader))["target"].shape == (2, 3, 16, 16)
    val = list(build_val_loader(f"{photos}/train-{{000000..000002}}.tar", noise=SIGMA))
    assert len(val) == 6


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
    loader = build_train_loader(str(tmp_path / "evil.tar"), patch_size=8, batch_size=2, seed=0, num_workers=0,
                                noise=SIGMA)
    list(itertools.islice(iter(loader), 3))
    list(build_val_loader(str(tmp_path / "evil.tar"), noise=SIGMA))
    assert not marker.exists()  # ... and the stream never did


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    good = encode_png(np.full((8, 8, 3), 9, np.uint8))
    samples = [(f"k{i}", {"target.png": good}) for i in range(6)]
    samples[2] = ("broken", {"target.png": good[:40]})
    samples[4] = ("lonely", {"json": b"{}"})
    _write_shard(tmp_path / "bad.tar", samples)
    source = str(tmp_path / "bad.tar")
    with pytest.warns(UserWarning, match=r"bad\.tar, key broken"):
        batches = list(itertools.islice(iter(build_train_loader(
            source, patch_size=8, batch_size=4, seed=0, num_workers=0, noise=SIGMA)), 4))
    assert sum(int(b["skipped"]) for b in batches) >= 2
    with pytest.warns(UserWarning, match="key lonely.*no target.png"):
        val = build_val_loader(source, noise=SIGMA)
        assert len(list(val)) == 4 and val.skipped == 2
    with pytest.raises(BadSampleError, match="broken"):
        list(build_val_loader(source, noise=SIGMA, strict=True))


@pytest.mark.timeout(60)
def test_truncated_shard_does_not_hang(tmp_path):
    good = encode_png(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    _write_shard(tmp_path / "t.tar", [(f"k{i}", {"target.png": good}) for i in range(8)])
    data = (tmp_path / "t.tar").read_bytes()
    (tmp_path / "t.tar").write_bytes(data[: len(data) // 2])
    with pytest.warns(UserWarning, match="t.tar"):
        val = list(build_val_loader(str(tmp_path / "t.tar"), noise=SIGMA))
        assert 0 < len(val) < 8
        loader = build_train_loader(str(tmp_path / "t.tar"), patch_size=8, batch_size=2, seed=0, num_workers=2,
                                    noise=SIGMA)
        assert len(list(itertools.islice(iter(loader), 5))) == 5
    with pytest.raises(BadSampleError, match="t.tar"):
        list(build_val_loader(str(tmp_path / "t.tar"), noise=SIGMA, strict=True))


@pytest.mark.timeout(60)
def test_all_bad_data_fails_instead_of_hanging(tmp_path):
    _write_shard(tmp_path / "junk.tar", [(f"k{i}", {"target.png": b"junk"}) for i in range(3)])
    loader = build_train_loader(str(tmp_path / "junk.tar"), patch_size=8, batch_size=2, seed=0, num_workers=0,
                                noise=SIGMA)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="no usable sample"):
        next(iter(loader))


def test_noise_must_match_the_data(tmp_path, photos):
    with pytest.raises(ValueError, match="clean images only"):
        build_train_loader(photos, patch_size=8, batch_size=2, seed=0)
    rng = np.random.default_rng(0)
    for folder in ("gt", "in"):
        (tmp_path / folder).mkdir()
        np.save(tmp_path / folder / "a.npy", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    assert pack_module.main(["--input", str(tmp_path / "in"), "--target", str(tmp_path / "gt"),
                             "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    with pytest.raises(ValueError, match="paired data"):
        build_val_loader(tmp_path / "out" / "train", noise=SIGMA)
