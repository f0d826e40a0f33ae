"""Pack a data set into WebDataset tar shards plus a JSON index per split.

    python -m data_shards.pack SRC_DIR --out OUT                      # clean images (noise added online)
    python -m data_shards.pack --input DIR --target DIR --out OUT     # pairs, matched by relative path
    python -m data_shards.pack --input left=DIR --input right=DIR --target DIR --out OUT  # dual-pixel
    python -m data_shards.pack --manifest FILE.csv --out OUT          # CSV/Parquet manifest

Output: OUT/<split>/<split>-000000.tar ... and OUT/<split>/index.json with its index.records (see
data_shards.index).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import shlex
import statistics
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_shards.codec import (MAX_PIXELS, ImageError, PixelLimitError, check_pixels, encode_npy, encode_png,
                               read_image, to_channels)
from data_shards.geometry import tile_positions
from data_shards.index import INDEX_NAME, MAX_NAME_CHARS, MAX_SAMPLE_BYTES, RECORDS_NAME, ShardIndex
from data_shards.remote import printable
from data_shards.sources import SampleSpec, Scan, SourceError, read_manifest, scan_clean, scan_paired
from data_shards.tar_writer import ShardWriter, tar_size

TRAIN = "train"


class PackError(RuntimeError):
    """The pack cannot run or was stopped (--strict); the message names the file and the fix."""


@dataclass(frozen=True)
class PackConfig:
    out: Path
    source: Path | None = None  # clean images
    inputs: tuple[tuple[str | None, Path], ...] = ()  # paired: (name or None, folder)
    target: Path | None = None
    manifest: Path | None = None
    format: str = "png"
    png_level: int = 1
    color: str = "keep"
    tile: int | None = None
    stride: int | None = None
    shard_samples: int = 10_000
    shard_bytes: int = 256 << 20
    spread_bytes: int = 512 << 20  # train split: tiles held back to spread one image over shards
    workers: int = 1
    val_fraction: float = 0.0
    split: str | None = None  # every sample into this one split (e.g. "val" for a test set)
    seed: int = 0
    strict: bool = False
    max_pixels: int = MAX_PIXELS  # largest source image read; what is stored stays within MAX_PIXELS
    overwrite: bool = False
    progress: bool = True
    command: str = ""


@dataclass
class PackReport:
    splits: dict[str, ShardIndex]
    skipped: list[tuple[str, str]]
    notes: list[tuple[str, str]]
    ignored: list[str]
    images: int
    seconds: float

    @property
    def samples(self) -> int:
        return sum(index.total_samples for index in self.splits.values())

    @property
    def bytes(self) -> int:
        return sum(shard.bytes for index in self.splits.values() for shard in index.shards)

    def summary(self) -> str:
        shards = sum(len(index.shards) for index in self.splits.values())
        rate = self.images / self.seconds if self.seconds > 0 else float("inf")
        lines = [f"packed {self.samples} samples from {self.images} images into {shards} shards "
                 f"({self.bytes / 1e6:.1f} MB) in {self.seconds:.1f} s: {rate:.1f} images/s, "
                 f"{len(self.skipped)} skipped"]
        for name, index in self.splits.items():
            lines.append(f"  {name}: {index.total_samples} samples from {index.source_images} images in "
                         f"{len(index.shards)} shards, sizes {index.min_size}..{index.max_size} -> "
                         f"{Path(index.location).parent}")
        if self.notes:
            lines.append(f"notes ({len(self.notes)}):")
            lines += [f"  {path}: {note}" for path, note in self.notes]
        if self.ignored:
            lines.append(f"ignored {len(self.ignored)} non-image files, e.g. {self.ignored[0]}")
        if self.skipped:
            lines.append(f"skipped {len(self.skipped)}:")
            lines += [f"  {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


@dataclass
class _Loaded:
    """What a worker returns for one source sample: encoded items or the reason it is bad."""

    spec: SampleSpec
    items: list[tuple[str, list[tuple[str, bytes]], tuple[int, int]]] = field(default_factory=list)
    channels: int = 0
    bit_depths: set[int] = field(default_factory=set)
    notes: list[tuple[str, str]] = field(default_factory=list)
    error: tuple[str, str] | None = None


def pack(config: PackConfig) -> PackReport:
    start = time.perf_counter()
    scan = _scan(config)
    if config.strict and scan.problems:
        raise PackError(_strict_message(scan.problems[0]))
    _prepare_output(config.out, config.overwrite)
    _check_uniform_channels(scan.samples, config.color)
    splits = _assign_splits(scan.samples, config.val_fraction, config.seed, config.split)
    skipped = list(scan.problems)
    notes: list[tuple[str, str]] = []
    indexes = {}
    bar = tqdm(total=len(scan.samples), unit="img", disable=not config.progress, file=sys.stderr)
    with bar, _Mapper(config.workers) as mapper:
        for split, samples in splits.items():
            folder = config.out / split
            folder.mkdir(parents=True, exist_ok=True)
            writer = ShardWriter(folder, split, config.shard_samples, config.shard_bytes)
            sink = _Spreader(writer, config.seed, config.spread_bytes) if split == TRAIN else writer
            tile = config.tile if split == TRAIN else None
            tasks = [(spec, config, tile) for spec in samples]
            stats = _SplitStats()
            try:
                for loaded in mapper.imap(_load_sample, tasks):
                    bar.update(1)
                    notes += loaded.notes
                    if loaded.error is not None:
                        if config.strict:
                            raise PackError(_strict_message(loaded.error))
                        skipped.append(loaded.error)
                        continue
                    stats.add(loaded)
                    for key, members, _ in loaded.items:
                        sink.add(key, members)
                if sink is not writer:
                    sink.flush()
            except BaseException:
                writer.abort()
                raise
            shards = writer.close()
            index = stats.index(split, shards, config)
            index_path = index.save(folder)
            indexes[split] = ShardIndex.load(index_path)
    return PackReport(indexes, skipped, notes, scan.ignored, len(scan.samples), time.perf_counter() - start)



def _scan(config: PackConfig) -> Scan:
    chosen = [config.source is not None, config.target is not None or bool(config.inputs),
              config.manifest is not None]
    if sum(chosen) != 1:
        raise PackError("give exactly one source: SRC_DIR, --input DIR --target DIR, or --manifest FILE")
    try:
        if config.source is not None:
            return scan_clean(config.source)
        if config.manifest is not None:
            return read_manifest(config.manifest)
        if config.target is None or not config.inputs:
            raise PackError("paired data needs both --input DIR and --target DIR")
        names = [name for name, _ in config.inputs]
        if len(config.inputs) > 1 and (None in names or len(set(names)) != len(names)):
            raise PackError("several inputs need distinct names: --input left=DIR --input right=DIR")
        return scan_paired(list(config.inputs), config.target)
    except SourceError as err:
        raise PackError(str(err)) from err


def _prepare_output(out: Path, overwrite: bool) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".pack-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise PackError(f"cannot write to --out {out} ({err}); choose a writable folder") from err
    existing = sorted(p.name for p in out.iterdir())
    if existing and not overwrite:
        raise PackError(f"--out {out} is not empty ({', '.join(existing[:5])}); "
                        "pass --overwrite to replace the packed splits in it, or choose an empty folder")
    for folder in (p for p in out.iterdir() if p.is_dir()):
        ours = [f for f in folder.iterdir() if f.name in (INDEX_NAME, INDEX_NAME + ".tmp", RECORDS_NAME,
                                                          RECORDS_NAME + ".tmp")
                or f.name.endswith((".tar", ".tar.tmp"))]
        for path in ours:
            path.unlink()
        if ours and not any(folder.iterdir()):
            folder.rmdir()


def _check_uniform_channels(samples: list[SampleSpec], color: str) -> None:
    """With --color keep, gray and RGB images must not be mixed: a batch needs one channel count."""
    if color != "keep":
        return
    found: dict[int, list[Path]] = {}
    for spec in samples:
        for path in (spec.target, *(p for _, p in spec.inputs)):
            channels = _probe_channels(path)
            if channels is not None:
                found.setdefault(channels, []).append(path)
    if len(found) > 1:
        detail = "; ".join(f"{len(paths)} with {c} channel(s), e.g. {paths[0]}" for c, paths in sorted(found.items()))
        raise PackError(f"the images mix gray and colour ({detail}); pass --color rgb or --color gray")


def _probe_channels(path: Path) -> int | None:
    """Channel count from the file header (alpha not counted); None if unreadable (reported later)."""
    try:
        if path.suffix.lower() == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            channels = 1 if len(shape) == 2 else shape[2]
            return channels - 1 if channels in (2, 4) else channels
        from PIL import Image

        with Image.open(path) as image:
            return 1 if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F") else 3
    except Exception:
        return None


def _assign_splits(samples: list[SampleSpec], val_fraction: float, seed: int,
                   only_split: str | None = None) -> dict[str, list[SampleSpec]]:
    """--split puts everything in one split; else manifest splits win; else a seeded fraction of
    whole images goes to 'val'.

    The train split's images are shuffled at pack time (seeded); _Spreader then spreads the tiles of
    each image over shards and positions.
    """
    rng = random.Random(seed)
    if only_split is not None:
        if val_fraction or any(spec.split is not None for spec in samples):
            raise PackError("--split puts every sample in one split: drop --val-fraction (or the "
                            "manifest's split column)")
        splits = {only_split: list(samples)}
    elif any(spec.split is not None for spec in samples):
        if val_fraction:
            raise PackError("the manifest has a split column; drop --val-fraction or the column")
        names = {spec.split or TRAIN for spec in samples}
        splits = {name: [s for s in samples if (s.split or TRAIN) == name] for name in sorted(names)}
    elif val_fraction > 0:
        if not 0 < val_fraction < 1 or len(samples) < 2:
            raise PackError(f"--val-fraction {val_fraction} needs 0 < f < 1 and at least two images")
        count = min(max(1, round(val_fraction * len(samples))), len(samples) - 1)
        val_keys = set(rng.sample([s.key for s in samples], count))
        splits = {TRAIN: [s for s in samples if s.key not in val_keys],
                  "val": [s for s in samples if s.key in val_keys]}
    else:
        splits = {TRAIN: list(samples)}
    if TRAIN in splits:
        rng.shuffle(splits[TRAIN])
    return splits


def _load_sample(task: tuple[SampleSpec, PackConfig, int | None]) -> _Loaded:
    """Runs in a worker: read, check, tile and encode one sample. Never raises for bad data."""
    spec, config, tile = task
    loaded = _Loaded(spec)
    current = spec.target
    try:
        arrays = {}
        for member, path in (("target", spec.target), *spec.inputs):
            current = path
            array, note = to_channels(read_image(path, config.max_pixels), config.color)
            if note:
                loaded.notes.append((str(path), note))
            arrays[member] = array
        current = spec.target
        shape = arrays["target"].shape
        for member, array in arrays.items():
            if array.shape != shape:
                raise ImageError(f"{member} is {_describe(array)} but the target is {_describe(arrays['target'])}")
        loaded.channels = shape[2]
        loaded.bit_depths = {8 * a.dtype.itemsize for a in arrays.values()}
        height, width = shape[:2]
        h, w = (min(tile, height), min(tile, width)) if tile else (height, width)
        try:  # the stream decodes stored samples under the default limit, whatever --max-pixels said
            check_pixels(h, w, MAX_PIXELS)
        except PixelLimitError as err:
            raise ImageError(f"stored {'in tiles' if tile else 'whole'}: {err} that the training stream decodes; "
                             + ("use a smaller --tile" if tile else "cut it with --tile (train split only)")) from err
        stride = config.stride or tile
        ys = tile_positions(height, tile, stride) if tile else [0]
        xs = tile_positions(width, tile, stride) if tile else [0]
        for y in ys:
            for x in xs:
                key = f"{spec.key}-tile{y}x{x}" if tile else spec.key
                if len(key) > MAX_NAME_CHARS:
                    raise ImageError(f"its key is {len(key)} characters long, over the index's {MAX_NAME_CHARS}: "
                                     "shorten the folder names (or give a manifest with a key column)")
                meta = {"source": spec.source, "tile": [y, x] if tile else None}
                members = [(f"{member}.{config.format}", _encode(array[y:y + h, x:x + w], config))
                           for member, array in arrays.items()]
                members.append(("json", json.dumps(meta, sort_keys=True).encode()))
                # Each member may also get a PAX header for its long name: a header and a record block.
                size = tar_size(members) + 2 * tarfile.BLOCKSIZE * len(members)
                if size > MAX_SAMPLE_BYTES:
                    raise ImageError(f"a sample of {size:,} bytes is over the {MAX_SAMPLE_BYTES:,} that the index "
                                     "admits (a target and two inputs at the pixel limit): use a smaller --tile")
                loaded.items.append((key, members, (h, w)))
    except PixelLimitError as err:
        loaded.items.clear()
        loaded.error = (str(current), f"{err} (--max-pixels raises it; images above {MAX_PIXELS:,} pixels "
                                      "also need --tile)")
    except (ImageError, OSError) as err:
        loaded.items.clear()
        loaded.error = (str(current), str(err))
    return loaded


def _encode(array: np.ndarray, config: PackConfig) -> bytes:
    return encode_npy(array) if config.format == "npy" else encode_png(array, config.png_level)


def _describe(array: np.ndarray) -> str:
    return f"{array.shape[1]}x{array.shape[0]}x{array.shape[2]}"


def _strict_message(problem: tuple[str, str]) -> str:
    return f"{problem[0]}: {problem[1]} (--strict stops here; without it the sample is skipped and listed)"


class _SplitStats:
    def __init__(self):
        self.sizes: list[tuple[int, int]] = []
        self.channels: set[int] = set()
        self.bit_depths: set[int] = set()
        self.images = 0
        self.inputs: tuple[str, ...] = ()

    def add(self, loaded: _Loaded) -> None:
        self.images += 1
        self.channels.add(loaded.channels)
        self.bit_depths |= loaded.bit_depths
        self.inputs = tuple(name for name, _ in loaded.spec.inputs)
        self.sizes += [size for _, _, size in loaded.items]

    def index(self, split: str, shards, config: PackConfig) -> ShardIndex:
        heights = sorted(h for h, _ in self.sizes)
        widths = sorted(w for _, w in self.sizes)
        has = bool(self.sizes)
        return ShardIndex(
            split=split, shards=tuple(shards), total_samples=sum(s.samples for s in shards),
            inputs=self.inputs, channels=max(self.channels, default=0),
            bit_depths=tuple(sorted(self.bit_depths)), format=config.format,
            min_size=(heights[0], widths[0]) if has else None,
            median_size=(int(statistics.median_low(heights)), int(statistics.median_low(widths))) if has else None,
            max_size=(heights[-1], widths[-1]) if has else None,
            source_images=self.images, tile=config.tile if split == TRAIN else None,
            stride=(config.stride or config.tile) if split == TRAIN and config.tile else None,
            command=config.command, version=_version(),
        )


class _Spreader:
    """A seeded shuffle buffer in front of the shard writer: it holds encoded samples up to `max_bytes`
    and writes a randomly chosen one whenever it is full, so the tiles of one image, which arrive
    together, land far apart (over about max_bytes of output). Samples arrive in input order whatever
    the --workers count, so the output stays byte-identical."""

    def __init__(self, writer: ShardWriter, seed: int, max_bytes: int):
        self.writer, self.max_bytes = writer, max_bytes
        self.rng = random.Random(f"spread-{seed}")
        self.held: list[tuple[str, list[tuple[str, bytes]]]] = []
        self.bytes = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        self.held.append((key, members))
        self.bytes += _sample_bytes(members)
        while self.held and self.bytes > self.max_bytes:
            self._write(self.rng.randrange(len(self.held)))

    def flush(self) -> None:
        while self.held:
            self._write(self.rng.randrange(len(self.held)))

    def _write(self, pick: int) -> None:
        self.held[pick], self.held[-1] = self.held[-1], self.held[pick]
        key, members = self.held.pop()
        self.bytes -= _sample_bytes(members)
        self.writer.add(key, members)


def _sample_bytes(members: list[tuple[str, bytes]]) -> int:
    return sum(len(data) for _, data in members)


class _Mapper:
    """Ordered map over a spawn pool (deterministic output whatever the worker count), or in-process."""

    def __init__(self, workers: int):
        self.pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None

    def imap(self, fn, tasks: Iterable) -> Iterator:
        return self.pool.imap(fn, tasks, chunksize=2) if self.pool else map(fn, tasks)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.terminate()
            self.pool.join()


def _version() -> str:
    try:
        return metadata.version("restormer-train")
    except metadata.PackageNotFoundError:
        return "unknown"


def _parse_input(value: str) -> tuple[str | None, Path]:
    name, sep, folder = value.partition("=")
    return (name, Path(folder)) if sep else (None, Path(value))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="restormer-pack", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = parser.add_argument_group("source (exactly one)")
    src.add_argument("source", nargs="?", type=Path,
                     help="folder tree of clean images (degradation is synthesised while training)")
    src.add_argument("--input", action="append", type=_parse_input, default=[], metavar="[NAME=]DIR",
                     help="degraded images, matched to --target by relative path without suffix; repeat "
                          "with names for several inputs per sample (dual-pixel: left=DIR right=DIR; the "
                          "stream concatenates them along channels in this order)")
    src.add_argument("--target", type=Path, metavar="DIR", help="clean images for --input")
    src.add_argument("--manifest", type=Path, metavar="FILE",
                     help="CSV or Parquet with columns target, input or input_<name>, optional split and key "
                          "(relative paths are relative to the manifest's folder)")
    out = parser.add_argument_group("output")
    out.add_argument("--out", type=Path, required=True, help="output folder; gets <split>/ subfolders")
    out.add_argument("--overwrite", action="store_true",
                     help="replace the shards and indexes already in --out (other files are kept)")
    out.add_argument("--format", choices=("png", "npy"), default="png",
                     help="png: lossless, 8/16-bit as stored; npy: raw arrays, larger, no decode cost")
    out.add_argument("--png-level", type=int, default=1, choices=range(10), metavar="0-9",
                     help="zlib level for PNG (1: fast packing, small size cost; default %(default)s)")
    out.add_argument("--color", choices=("keep", "rgb", "gray"), default="keep",
                     help="keep channels as stored (gray and RGB must not be mixed), or convert all "
                          "to rgb / gray; alpha is always dropped and noted")
    out.add_argument("--tile", type=int, metavar="SIZE",
                     help="cut train images into SIZExSIZE tiles (other splits stay whole for validation)")
    out.add_argument("--stride", type=int, metavar="S", help="tile step (default: SIZE, no overlap)")
    out.add_argument("--shard-samples", type=int, default=10_000, help="max samples per shard")
    out.add_argument("--shard-mb", type=float, default=256, help="max MB per shard (default %(default)s)")
    out.add_argument("--spread-mb", type=float, default=512,
                     help="train split: MB of samples held in memory to spread the tiles of one image over "
                          "shards and positions (default %(default)s; 0 keeps them together)")
    split = parser.add_argument_group("split")
    split.add_argument("--val-fraction", type=float, default=0.0,
                       help="fraction of whole images held out into val/ (a manifest's split column replaces this)")
    split.add_argument("--split", metavar="NAME", default=None,
                       help="put every sample into one split, e.g. --split val for a test set kept whole")
    split.add_argument("--seed", type=int, default=0, help="seed of the val draw and the train order")
    run = parser.add_argument_group("run")
    run.add_argument("--workers", type=int, default=1, help="parallel processes; output is identical for any N")
    run.add_argument("--strict", action="store_true",
                     help="stop at the first bad sample instead of skipping it and listing it at the end")
    run.add_argument("--max-pixels", type=int, default=MAX_PIXELS, metavar="N",
                     help="largest image read, in pixels, checked from the file header before decoding (default "
                          "%(default)s = 8192x8192; larger ones are skipped and listed); a stored sample must stay "
                          "within the default, so images above it need --tile")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.tile is not None and args.tile < 8:
        parser.error("--tile must be at least 8")
    if args.stride is not None and (args.tile is None or not 0 < args.stride):
        parser.error("--stride needs --tile and must be positive")
    if args.shard_samples < 1 or args.shard_mb <= 0 or args.spread_mb < 0:
        parser.error("--shard-samples must be at least 1, --shard-mb positive and --spread-mb >= 0")
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if not 0 <= args.val_fraction < 1:
        parser.error(f"--val-fraction {args.val_fraction} must be in [0, 1)")
    if args.max_pixels < 1:
        parser.error("--max-pixels must be at least 1")
    config = PackConfig(
        out=args.out, source=args.source, inputs=tuple(args.input), target=args.target, manifest=args.manifest,
        format=args.format, png_level=args.png_level, color=args.color, tile=args.tile, stride=args.stride,
        shard_samples=args.shard_samples, shard_bytes=int(args.shard_mb * (1 << 20)),
        spread_bytes=int(args.spread_mb * (1 << 20)), workers=args.workers,
        val_fraction=args.val_fraction, split=args.split, seed=args.seed, strict=args.strict,
        max_pixels=args.max_pixels, overwrite=args.overwrite,
        progress=not args.no_progress,
        command=printable(shlex.join(["restormer-pack", *(sys.argv[1:] if argv is None else argv)])),
    )
    try:
        report = pack(config)
    except PackError as err:
        print(f"restormer-pack: error: {err}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
