"""The JSON index written next to the shards of one split: what streaming and verify rely on."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from data_shards.remote import read_bytes, redact

INDEX_NAME = "index.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ShardInfo:
    name: str  # file name, relative to the index's folder
    samples: int
    bytes: int
    sha256: str
    # samples + 1 byte positions in the tar: sample i (all its members, headers included) occupies
    # offsets[i]:offsets[i + 1], so a reader can seek to any sample. None in indexes written before.
    offsets: tuple[int, ...] | None = None


@dataclass(frozen=True)
class ShardIndex:
    """One split of a packed data set.

    Sample layout in every shard (webdataset keys never contain a dot):
      KEY.target.(png|npy)   the clean image, (H, W, C)
      KEY.<input>.(png|npy)  one member per name in `inputs`: "input" for paired data, e.g.
                             "input_left"/"input_right" for dual-pixel; none for clean-only data
      KEY.json               {"source": path of the target relative to its root, "tile": [y, x] or null}
    Sizes are (height, width) of the stored images (tiles when packed with --tile).
    """

    split: str
    shards: tuple[ShardInfo, ...]
    total_samples: int
    inputs: tuple[str, ...]
    channels: int
    bit_depths: tuple[int, ...]
    format: str  # "png" or "npy"
    min_size: tuple[int, int] | None
    median_size: tuple[int, int] | None
    max_size: tuple[int, int] | None
    source_images: int
    tile: int | None
    stride: int | None
    command: str
    version: str
    format_version: int = FORMAT_VERSION
    location: str | None = field(default=None, compare=False)  # the file it was loaded from; not stored

    @property
    def shard_urls(self) -> list[str]:
        """Shard locations next to the index file (local paths or URLs)."""
        if self.location is None or self.location.startswith("pipe:"):
            raise ValueError("this index was not loaded from a file or URL, so its shards cannot be "
                             "located; pass the shard pattern (e.g. 'train-{000000..000009}.tar')")
        if "://" in self.location:
            base = self.location.rsplit("/", 1)[0]
            return [f"{base}/{shard.name}" for shard in self.shards]
        return [str(Path(self.location).parent / shard.name) for shard in self.shards]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("location")
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Writes folder/index.json atomically (temp name, then rename)."""
        target = Path(folder) / INDEX_NAME
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(self.to_json(), encoding="utf-8")
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, where: str | Path) -> ShardIndex:
        """Loads from a split folder or an index file (a local path or a URL that data_shards.remote opens)."""
        text, location = _read_index_text(str(where))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{redact(str(where))}: not a valid shard index ({err})") from err
        if data.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{redact(str(where))}: index format_version {data.get('format_version')!r}, "
                             f"this code reads {FORMAT_VERSION}; re-pack with `restormer-pack`")
        data["shards"] = tuple(_shard_info(shard) for shard in data["shards"])
        for name in ("min_size", "median_size", "max_size"):
            data[name] = tuple(data[name]) if data[name] is not None else None
        data["inputs"] = tuple(data["inputs"])
        data["bit_depths"] = tuple(data["bit_depths"])
        return cls(**data, location=location)


def _shard_info(data: dict) -> ShardInfo:
    offsets = data.pop("offsets", None)
    return ShardInfo(**data, offsets=tuple(offsets) if offsets is not None else None)


def member_key(name: str) -> tuple[str, str]:
    """A tar member's sample key and extension, the webdataset way: 'val/a.target.png' -> ('val/a',
    'target.png'); the key keeps the folder, the extension starts at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


def scan_offsets(path: str | Path) -> tuple[int, ...]:
    """The offsets of ShardInfo for a tar on disk (reads only its headers): where each run of
    members sharing a key starts, and where the last one ends."""
    offsets, last_key, end = [], None, 0
    with tarfile.open(path, "r:") as tar:
        for info in tar:
            key = member_key(info.name)[0]
            if key != last_key:
                offsets.append(info.offset)
                last_key = key
            end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    return (*offsets, end)


def add_offsets(folder: str | Path) -> Path:
    """Rewrites the index of a local split folder packed before offsets were recorded."""
    index = ShardIndex.load(folder)
    base = Path(index.location).parent
    shards = []
    for shard in index.shards:
        try:
            offsets = scan_offsets(base / shard.name)
        except (OSError, tarfile.TarError) as err:
            raise ValueError(f"{base / shard.name}: cannot read its tar headers ({err}); check the split with "
                             "`restormer-verify`, re-pack it") from err
        if len(offsets) != shard.samples + 1:
            raise ValueError(f"{base / shard.name}: {len(offsets) - 1} samples in the tar but {shard.samples} "
                             "in the index; re-pack this split")
        shards.append(replace(shard, offsets=offsets))
    return replace(index, shards=tuple(shards)).save(base)


def _read_index_text(where: str) -> tuple[str, str]:
    if "://" in where or where.startswith("pipe:"):
        return read_bytes(where).decode("utf-8"), where
    path = Path(where)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no shard index here; a finished `restormer-pack` run writes "
                                f"OUT/<split>/{INDEX_NAME} (an unfinished one leaves none)")
    return path.read_text(encoding="utf-8"), str(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards.index",
                                     description="Add sample byte offsets to split indexes packed without them "
                                                 "(reads only the tar headers; the shards are not changed).")
    parser.add_argument("split", nargs="+", help="split folder(s) holding index.json and the shards")
    for split_folder in parser.parse_args(argv).split:
        try:
            print(f"wrote {add_offsets(split_folder)}")
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
