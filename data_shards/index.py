"""The JSON index written next to the shards of one split: what streaming and verify rely on."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
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
        tmp.write_text(self.to_json())
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
        data["shards"] = tuple(ShardInfo(**shard) for shard in data["shards"])
        for name in ("min_size", "median_size", "max_size"):
            data[name] = tuple(data[name]) if data[name] is not None else None
        data["inputs"] = tuple(data["inputs"])
        data["bit_depths"] = tuple(data["bit_depths"])
        return cls(**data, location=location)


def _read_index_text(where: str) -> tuple[str, str]:
    if "://" in where or where.startswith("pipe:"):
        return read_bytes(where).decode("utf-8"), where
    path = Path(where)
    if path.is_dir():
        path = path / INDEX_NAME
    if not path.exists():
        raise FileNotFoundError(f"{path}: no shard index here; a finished `restormer-pack` run writes "
                                f"OUT/<split>/{INDEX_NAME} (an unfinished one leaves none)")
    return path.read_text(), str(path)
