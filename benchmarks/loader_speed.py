"""Loader throughput: our shard stream vs a BasicSR-style folder-of-PNG loader on the same photos.

    python benchmarks/loader_speed.py [--images 16] [--size 1024] [--batches 30] [--workers 1 2 4]

Source: the demo's bundled photos (scikit-image, matplotlib) resized to SIZExSIZE RGB PNGs (zlib level 6, as datasets ship).
Task: Gaussian denoising sigma 25, random crop + 8 flips/rotations, batch 8, float32 [0, 1].
- folder:      decode the whole PNG, then crop (the BasicSR way), torch DataLoader, batch_size 8
- stream png:  `restormer-pack --tile 256 --format png`, then build_train_loader
- stream npy:  `restormer-pack --tile 256 --format npy` (raw arrays: no decode cost)
samples/s counts training samples delivered after a warm-up; MB/s is storage read (bytes per stored
sample or file x samples/s). With 1 worker, 1000 / (samples/s) is the CPU cost of one sample on one
core, which sizes --num_workers against the GPU's consumption. Pack throughput is images/s.
"""

from __future__ import annotations

import argparse
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

from data_shards.codec import read_image, to_channels
from data_shards.degrade import NoiseConfig, add_noise, paired_crop
from data_shards.demo import TRAIN_IMAGES, VAL_IMAGES
from data_shards.geometry import dihedral
from data_shards.index import ShardIndex
from data_shards.pack import PackConfig, pack
from data_shards.stream import build_train_loader

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


def folder_rate(files, patch, workers, count) -> float:
    dataset = FolderPNG(files, patch)
    sampler = RandomSampler(dataset, replacement=True, num_samples=10**9)
    loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler, num_workers=workers)
    return rate(iter(loader), count)


def stream_rate(source, patch, workers, count) -> float:
    loader = build_train_loader(source, patch_size=patch, batch_size=BATCH, seed=0, num_workers=workers,
                                noise=NOISE)
    return rate(iter(loader), count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--patches", type=int, nargs="+", default=[128, 256])
    parser.add_argument("--pack-images", type=int, default=64, help="images for the pack throughput rows")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="loader-speed-") as tmp:
        tmp = Path(tmp)
        (tmp / "src").mkdir()
        files = make_sources(tmp / "src", args.images, args.size)
        folder_bytes = np.mean([f.stat().st_size for f in files])
        print(f"{len(files)} source PNGs of {args.size}x{args.size} RGB, {folder_bytes / 1e6:.2f} MB each\n")

        # Pack throughput on copies of the sources, so that worker start-up is amortised.
        (tmp / "many").mkdir()
        for i in range(args.pack_images):
            shutil.copy(files[i % len(files)], tmp / "many" / f"copy{i:03d}.png")
        print(f"| pack ({args.pack_images} images) | workers | images/s | samples | MB |\n|---|---|---|---|---|")
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

        sources = {}
        for fmt in ("png", "npy"):
            out = tmp / fmt
            pack(PackConfig(out=out, source=tmp / "src", format=fmt, tile=256, shard_samples=32, progress=False))
            sources[fmt] = out / "train"

        loaders = {"folder PNG (decode full, crop)": (lambda p, w, n: folder_rate(files, p, w, n), folder_bytes)}
        for fmt, source in sources.items():
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
        folder_name = "folder PNG (decode full, crop)"
        for patch in args.patches:
            for workers in args.workers:
                base = results[(folder_name, patch, workers)]
                ratios = ", ".join(f"{name}: {results[(name, patch, workers)] / base:.1f}x"
                                   for name in loaders if name != folder_name)
                print(f"patch {patch}, {workers} workers, speed-up over the folder loader: {ratios}")


if __name__ == "__main__":
    main()
