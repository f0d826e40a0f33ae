"""Loader throughput: our shard stream vs a BasicSR-style folder-of-PNG loader on the same photos, the
stream's shuffle quality and its resume time.

    python benchmarks/loader_speed.py [--images 16] [--size 1024] [--batches 30] [--workers 1 2 4]
                                      [--sections pack speed check shuffle resume]

Source: the demo's bundled photos (scikit-image, matplotlib) resized to SIZExSIZE RGB PNGs (zlib level 6, as datasets ship).
Task: Gaussian denoising sigma 25, random crop + 8 flips/rotations, batch 8, float32 [0, 1].
- folder:      decode the whole PNG, then crop (the BasicSR way), torch DataLoader, batch_size 8
- stream png:  `restormer-pack --tile 256 --format png`, then build_train_loader
- stream npy:  `restormer-pack --tile 256 --format npy` (raw arrays: no decode cost)
samples/s counts training samples delivered after a warm-up; MB/s is storage read (bytes per stored
sample or file x samples/s). With 1 worker, 1000 / (samples/s) is the CPU cost of one sample on one
core, which sizes --num_workers against the GPU's consumption. Samples per CPU-second (each loader
in-process) is the same cost measured in CPU time, steady on a loaded machine where wall-clock
rates are not. Pack throughput is images/s.

Shuffle: a dual-pixel-style 16-bit pack (left, right, target; tile 512, stride 256 on 1680x1120:
24 tiles per image), scaled down 8x per side (tile 64, stride 32 on 210x140, random pixels so that
PNG sizes scale too) with every byte budget scaled by 1/64 alike (shards of ~85 samples as 256 MB
shards hold, the pack's 512 MB spread buffer). Figures: distinct source images per batch of 8, and per
64 consecutive draws (the order-quality figure: a buffer or a sequential read shows there), against
what a uniform permutation gives.
Check: the cost of proving each sample against the index (the BLAKE3 digest of its bytes, which the
stream computes on every read), per sample and per MB, beside the stream's whole CPU cost per sample
(in-process, patch 128): the share of the loader's time that the check takes.
Resume: the time from building the stream at position 10^6 + 12345 of a 10^6-sample index (1000
names for one real 1000-sample shard) to its first batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, RandomSampler

from data_shards.codec import encode_png, read_image, to_channels
from data_shards.degrade import NoiseConfig, add_noise, paired_crop
from data_shards.demo import TRAIN_IMAGES, VAL_IMAGES
from data_shards.geometry import dihedral
from data_shards.index import ShardIndex, sample_digest
from data_shards.pack import PackConfig, pack
from data_shards.stream import StreamSettings, build_train_loader

BATCH = 8
NOISE = NoiseConfig(sigma=25)


class FolderPNG(Dataset):
    """What BasicSR's paired/denoising datasets do per sample: decode the full file, crop, augment."""

    def __init__(self, files: list[Path], patch: int):
        self.files, self.patch = files, patch

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        rng = np.random.default_rng()
        image = np.asarray(Image.open(self.files[i]).convert("RGB"))
        (crop,) = paired_crop([image], self.patch, rng)
        clean = np.ascontiguousarray(dihedral(crop, int(rng.integers(8)))).astype(np.float32) / 255
        noisy = add_noise(clean, NOISE, rng)
        return torch.from_numpy(noisy.transpose(2, 0, 1)), torch.from_numpy(clean.transpose(2, 0, 1))


def make_sources(folder: Path, count: int, size: int) -> list[Path]:
    bundled = TRAIN_IMAGES + VAL_IMAGES
    bundled = bundled * (count // len(bundled) + 1)
    files = []
    for i, source in enumerate(bundled[:count]):
        image = to_channels(read_image(source.file()), "rgb")[0]
        path = folder / f"photo{i:03d}.png"
        Image.fromarray(image).resize((size, size), Image.BICUBIC).save(path, compress_level=6)
        files.append(path)
    return files


def rate(batches, count: int) -> float:
    next(batches)  # warm-up: worker start, shuffle buffer fill
    next(batches)
    start = time.perf_counter()
    for _ in itertools.islice(batches, count):
        pass
    return count * BATCH / (time.perf_counter() - start)


def cpu_rate(batches, count: int) -> float:
    """Samples per CPU-second of this process (the loader runs in-process): per-core cost, steady on a
    loaded machine where wall-clock rates are not."""
    next(batches)
    start = time.process_time()
    for _ in itertools.islice(batches, count):
        pass
    return count * BATCH / (time.process_time() - start)


def folder_rate(files, patch, workers, count) -> float:
    dataset = FolderPNG(files, patch)
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
    return rate(iter(loader), count)


def stream_rate(source, patch, workers, count) -> float:
    settings = StreamSettings(patch=patch, batch=BATCH, num_workers=workers, noise=NOISE)
    return rate(iter(build_train_loader(source, settings)), count)


def tile_pack(tmp: Path, fmt: str) -> Path:
    """The sources cut into 256 px tiles, packed once (png or npy)."""
    out = tmp / fmt
    if not (out / "train").is_dir():
        pack(PackConfig(out=out, source=tmp / "src", format=fmt, tile=256, shard_samples=32, progress=False))
    return out / "train"


# ---------------------------------------------------------------- the per-sample check

def check_section(tmp: Path, args) -> None:
    print("\n| tiles 256 | kB / sample | digest check, µs / sample | digest MB/s | stream, ms / sample (CPU, patch 128) "
          "| check's share |\n|---|---|---|---|---|---|")
    for fmt in ("png", "npy"):
        source = tile_pack(tmp, fmt)
        index = ShardIndex.load(source)
        samples = []
        for shard in index.shards:
            data = (source / shard.name).read_bytes()
            samples += [data[start:end] for start, end in zip(shard.offsets, shard.offsets[1:])]
        rounds = max(1, 2000 // len(samples))
        start = time.process_time()
        for _ in range(rounds):
            for data in samples:
                sample_digest(data)
        digest_s = (time.process_time() - start) / (rounds * len(samples))
        stream_s = 1 / cpu_rate(iter(build_train_loader(source, StreamSettings(
            patch=128, batch=BATCH, num_workers=0, noise=NOISE))), args.batches)
        size = np.mean([len(data) for data in samples])
        print(f"| {fmt} | {size / 1e3:.0f} | {digest_s * 1e6:.0f} | {size / digest_s / 1e6:.0f} | {stream_s * 1e3:.2f} "
              f"| {digest_s / stream_s:.1%} |", flush=True)


# ---------------------------------------------------------------- shuffle quality

SCALE = 8  # the dual-pixel geometry, 8x smaller per side
DP_TILE, DP_STRIDE, DP_SIZE = 512 // SCALE, 256 // SCALE, (1120 // SCALE, 1680 // SCALE)


def dual_pixel_pack(folder: Path, images: int, spread: bool) -> Path:
    """Left/right/target 16-bit RGB; the top byte of the target's red channel is the image number."""
    rng = np.random.default_rng(0)
    for name in ("left", "right", "target"):
        (folder / "src" / name).mkdir(parents=True, exist_ok=True)
    for i in range(images):
        for name in ("left", "right", "target"):
            path = folder / "src" / name / f"im{i:03d}.png"
            if not path.exists():
                pixels = rng.integers(0, 65536, (*DP_SIZE, 3), dtype=np.uint16)
                if name == "target":
                    pixels[..., 0] = (i << 8) | (pixels[..., 0] & 0xFF)
                path.write_bytes(encode_png(pixels, 1))
    out = folder / ("spread" if spread else "together")
    pack(PackConfig(out=out, inputs=(("left", folder / "src" / "left"), ("right", folder / "src" / "right")),
                    target=folder / "src" / "target", tile=DP_TILE, stride=DP_STRIDE, shard_samples=85,
                    spread_bytes=(512 << 20) // SCALE**2 if spread else 0, progress=False))
    return out / "train"


def source_of(batch: dict) -> list[int]:
    return [int(round(float(v) * 65535)) >> 8 for v in batch["target"][:, 0, 0, 0]]


def distinct(draws: list[int], window: int) -> float:
    return float(np.mean([len(set(draws[i:i + window])) for i in range(0, len(draws) - window + 1, window)]))


def uniform_distinct(images: int, tiles: int, window: int) -> float:
    """Expected distinct images among `window` draws without replacement from images x tiles."""
    total = images * tiles
    miss = np.prod([(total - tiles - j) / (total - j) for j in range(window)])
    return images * (1 - miss)


def shuffle_section(tmp: Path, images: int) -> None:
    draws_per_run = 1536
    rows = []
    for spread in (False, True):
        source = dual_pixel_pack(tmp / "dp", images, spread)
        index = ShardIndex.load(source)
        tiles = index.total_samples // images
        loader = build_train_loader(source, StreamSettings(patch=DP_TILE // 2, batch=BATCH, num_workers=1))
        draws = [s for batch in itertools.islice(iter(loader), draws_per_run // BATCH) for s in source_of(batch)]
        rows.append(("stream", "spread" if spread else "together", distinct(draws, 8), distinct(draws, 64)))
    print(f"\nshuffle: {images} dual-pixel-style images x {tiles} tiles (16-bit, 3 members), "
          f"{len(index.shards)} shards, batch {BATCH}")
    print("| stream | pack order of an image's tiles | distinct images / batch of 8 | distinct / 64 draws |")
    print("|---|---|---|---|")
    for name, layout, per8, per64 in rows:
        print(f"| {name} | {layout} | {per8:.2f} | {per64:.1f} |")
    print(f"| uniform permutation (ideal) | | {uniform_distinct(images, tiles, 8):.2f} | "
          f"{uniform_distinct(images, tiles, 64):.1f} |")


# ---------------------------------------------------------------- resume time

def resume_section(tmp: Path) -> None:
    folder = tmp / "million"
    (folder / "src").mkdir(parents=True)
    for i in range(1000):
        np.save(folder / "src" / f"s{i:04d}.npy", np.full((16, 16, 1), i % 256, np.uint8))
    pack(PackConfig(out=folder / "one", source=folder / "src", format="npy", progress=False))
    one = ShardIndex.load(folder / "one" / "train")
    (shard,) = one.shards
    (folder / "big").mkdir()
    shards = []
    for i in range(1000):
        name = f"train-{i:06d}.tar"
        (folder / "big" / name).symlink_to(folder / "one" / "train" / shard.name)
        shards.append(dataclasses.replace(shard, name=name))
    dataclasses.replace(one, shards=tuple(shards), total_samples=1000 * shard.samples).save(folder / "big")
    position = 10**6 + 12345
    for workers in (0, 2):
        start = time.perf_counter()
        settings = StreamSettings(patch=16, batch=BATCH, num_workers=workers, noise=NOISE, start=position)
        batch = next(iter(build_train_loader(folder / "big", settings)))
        seconds = time.perf_counter() - start
        assert int(batch["next_position"]) == position + BATCH
        print(f"resume at position {position} of a {1000 * shard.samples}-sample index, {workers} workers: "
              f"first batch after {seconds:.2f} s (index load, epoch permutation, {BATCH} seeks)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--patches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--pack-images", type=int, default=64, help="images for the pack throughput rows")
    parser.add_argument("--shuffle-images", type=int, default=64, help="images of the dual-pixel-style pack")
    parser.add_argument("--sections", nargs="+", default=["pack", "speed", "check", "shuffle", "resume"],
                        choices=["pack", "speed", "check", "shuffle", "resume"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loader-speed-") as tmp:
        tmp = Path(tmp)
        if {"pack", "speed", "check"} & set(args.sections):
            (tmp / "src").mkdir()
            files = make_sources(tmp / "src", args.images, args.size)
            print(f"{len(files)} source PNGs of {args.size}x{args.size} RGB, "
                  f"{np.mean([f.stat().st_size for f in files]) / 1e6:.2f} MB each\n")
        if "pack" in args.sections:
            pack_section(tmp, files, args.pack_images)
        if "speed" in args.sections:
            speed_section(tmp, files, args)
        if "check" in args.sections:
            check_section(tmp, args)
        if "shuffle" in args.sections:
            shuffle_section(tmp, args.shuffle_images)
        if "resume" in args.sections:
            resume_section(tmp)


def pack_section(tmp: Path, files: list[Path], count: int) -> None:
    """Pack throughput on copies of the sources, so that worker start-up is amortised."""
    (tmp / "many").mkdir()
    for i in range(count):
        shutil.copy(files[i % len(files)], tmp / "many" / f"copy{i:03d}.png")
    print(f"| pack ({count} images) | workers | images/s | samples | MB |\n|---|---|---|---|---|")
    for fmt in ("png", "npy"):
        for workers in (1, 2):
            # The real command line: its worker processes do not inherit this script's torch import.
            summary = subprocess.run(
                [sys.executable, "-m", "data_shards.pack", str(tmp / "many"), "--out", str(tmp / f"p{fmt}{workers}"),
                 "--format", fmt, "--tile", "256", "--workers", str(workers), "--no-progress"],
                check=True, capture_output=True, text=True).stdout
            images_s = re.search(r"([\d.]+) images/s", summary).group(1)
            index = ShardIndex.load(tmp / f"p{fmt}{workers}" / "train")
            megabytes = sum(s.bytes for s in index.shards) / 1e6
            print(f"| {fmt}, tile 256 | {workers} | {images_s} | {index.total_samples} | {megabytes:.1f} |")


def speed_section(tmp: Path, files: list[Path], args) -> None:
    folder_bytes = np.mean([f.stat().st_size for f in files])
    loaders = {"folder PNG (decode full, crop)": (lambda p, w, n: folder_rate(files, p, w, n), folder_bytes)}
    for fmt in ("png", "npy"):
        source = tile_pack(tmp, fmt)
        index = ShardIndex.load(source)
        per_sample = sum(s.bytes for s in index.shards) / index.total_samples
        loaders[f"stream {fmt} tiles 256"] = (lambda p, w, n, s=source: stream_rate(s, p, w, n), per_sample)
    print("\n| loader | patch | workers | samples/s | MB/s read | ms/sample/core (1 worker) |")
    print("|---|---|---|---|---|---|")
    results = {}
    for patch in args.patches:
        for name, (measure, per_sample) in loaders.items():
            for workers in args.workers:
                samples_s = measure(patch, workers, args.batches)
                results[(name, patch, workers)] = samples_s
                cost = f"{1000 / samples_s:.1f}" if workers == 1 else ""
                print(f"| {name} | {patch} | {workers} | {samples_s:.0f} | "
                      f"{samples_s * per_sample / 1e6:.1f} | {cost} |", flush=True)
    print("\n| patch | folder PNG samples/CPU-s | stream png tiles 256 | stream npy tiles 256 |")
    print("|---|---|---|---|")
    for patch in args.patches:
        folder = DataLoader(FolderPNG(files, patch), batch_size=BATCH, num_workers=0,
                            sampler=RandomSampler(files, replacement=True, num_samples=10**9))
        streams = [cpu_rate(iter(build_train_loader(tmp / fmt / "train", StreamSettings(
            patch=patch, batch=BATCH, num_workers=0, noise=NOISE))), args.batches) for fmt in ("png", "npy")]
        print(f"| {patch} | {cpu_rate(iter(folder), args.batches):.0f} | "
              + " | ".join(f"{r:.0f}" for r in streams) + " |", flush=True)
    folder_name = "folder PNG (decode full, crop)"
    for patch in args.patches:
        for workers in args.workers:
            base = results[(folder_name, patch, workers)]
            ratios = ", ".join(f"{name}: {results[(name, patch, workers)] / base:.1f}x"
                               for name in loaders if name != folder_name)
            print(f"patch {patch}, {workers} workers, speed-up over the folder loader: {ratios}")


if __name__ == "__main__":
    main()
