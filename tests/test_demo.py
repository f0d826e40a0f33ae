"""The built-in demo data set: packed on first use, idempotent, race-safe, held-out validation."""

import itertools
import multiprocessing

from data_shards.demo import DEAD_LEAVES, DEMO_VERSION, MAX_SIDE, TRAIN_IMAGES, DemoData, demo_images, ensure_demo_data
from data_shards.index import ShardIndex
from data_shards.stream import NoiseConfig, StreamSettings, build_train_loader, build_val_loader


# 8 photos capped at 512 px (e.g. retina 1411 px -> 16 tiles instead of 121) and 16 dead-leaves
# images of 4 tiles each.
TRAIN_TILES = 177


def _ensure(root):
    ensure_demo_data(root)


def test_demo_is_packed_once_and_streams(tmp_path):
    root = tmp_path / "demo"
    data = ensure_demo_data(root)
    assert data == DemoData(root, root / "train", root / "val")
    train, val = ShardIndex.load(data.train), ShardIndex.load(data.val)
    assert train.total_samples == TRAIN_TILES and train.source_images == len(TRAIN_IMAGES) + DEAD_LEAVES
    assert train.max_size == (128, 128)
    # The held-out photos stay whole, at full size (rocket is the largest).
    assert val.total_samples == 3 and val.max_size == (427, 640) and train.channels == val.channels == 3
    stamp = (data.train / train.shards[0].name).stat().st_mtime_ns
    ensure_demo_data(root)
    assert (data.train / train.shards[0].name).stat().st_mtime_ns == stamp

    val_keys = [item["key"] for item in build_val_loader(data.val, noise=NoiseConfig(sigma=25))]
    assert val_keys == ["val/chelsea", "val/coffee", "val/rocket"]
    loader = build_train_loader(data.train, StreamSettings(patch=48, batch=4, num_workers=0,
                                                           noise=NoiseConfig(sigma=25)))
    batch = next(iter(loader))
    assert batch["input"].shape == (4, 3, 48, 48)


def test_racing_processes_leave_one_complete_copy(tmp_path):
    root = tmp_path / "demo"
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_ensure, args=(root,)) for _ in range(2)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
        assert process.exitcode == 0
    assert ShardIndex.load(root / "train").total_samples == TRAIN_TILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no staging folders left behind
    assert len(list(itertools.islice(build_val_loader(root / "val", noise=NoiseConfig(sigma=25)), 5))) == 3


def test_an_outdated_copy_is_rebuilt(tmp_path):
    root = tmp_path / "demo"
    ensure_demo_data(root)
    (root / "DEMO_VERSION").write_text("0\n")  # what an older release left behind
    (root / "train" / "index.json").unlink()
    ensure_demo_data(root)
    assert (root / "DEMO_VERSION").read_text().strip() == DEMO_VERSION
    assert ShardIndex.load(root / "train").total_samples == TRAIN_TILES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]


def test_train_photos_are_capped_and_the_validation_ones_held_out():
    images = demo_images()  # the dead leaves are seeded: tests/test_dead_leaves.py
    assert max(max(image.shape[:2]) for image in images["train"].values()) == MAX_SIDE
    assert sum(name.startswith("dead_leaves") for name in images["train"]) == DEAD_LEAVES
    assert not images["train"].keys() & images["val"].keys()


def test_the_held_out_photos_are_written_for_the_tools(tmp_path):
    """`python -m data_shards.demo --photos DIR`: the README's restore and evaluate examples run on these."""
    import numpy as np

    from data_shards.codec import read_image
    from data_shards.demo import VAL_IMAGES, main

    assert main(["--photos", str(tmp_path)]) == 0
    names = sorted(f"{image.name}.png" for image in VAL_IMAGES)
    for kind in ("clean", "noisy"):
        assert sorted(p.name for p in (tmp_path / kind).iterdir()) == names
    clean, noisy = (read_image(tmp_path / kind / names[0]).astype(np.float64) for kind in ("clean", "noisy"))
    assert clean.shape == noisy.shape and 20 < np.std(noisy - clean) < 25  # sigma 25, a little lost to clipping
