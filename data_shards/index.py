"""The JSON index written next to the shards of one split: what streaming and verify rely on.

Besides the split's description it records, per shard, where each sample lies (byte offsets), its
key, and a digest of its bytes, so that every read can prove that it got the sample the index
describes. An index is untrusted input like the shards: `ShardIndex.load` checks every field's type
and limits, and that shard names stay inside the index's folder or URL prefix, before anything uses it.

This module is also the one place that knows how a tar groups into samples (`tar_samples`), and how
a sample's digest is computed (`sample_digest`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import blake3
import numpy as np

from data_shards.codec import MAX_PIXELS
from data_shards.remote import RemoteSettings, read_bytes, redact

INDEX_NAME = "index.json"
FORMAT_VERSION = 1
# An index is read whole into memory: about 80 bytes per sample, so this admits ~10^7 samples.
MAX_INDEX_BYTES = 1 << 30
# One sample is read whole into memory before its digest is checked, so an index range is at most the
# largest sample pack writes, and no index can make a loader worker allocate more. An image is at most
# MAX_PIXELS of 16-bit RGB: 6 bytes per pixel as npy (plus a 128-byte header) or PNG, whose rows add a
# filter byte each (at most one per pixel, for a one-pixel-wide image) and whose deflate stream adds
# under 0.01% for data it cannot compress. A sample holds a target and up to two inputs (dual-pixel)
# that large, plus a JSON member and tar headers (64 KiB is ample); pack refuses a larger one.
MAX_IMAGE_BYTES = 7 * MAX_PIXELS + MAX_PIXELS // 1024
MAX_SAMPLE_BYTES = 3 * MAX_IMAGE_BYTES + (64 << 10)  # 1.31 GiB
MAX_NAME_CHARS = 255  # a key, the split's name, the version: printable, at most this long
DIGEST_BYTES = 16  # BLAKE3 output per sample: 128 bits, 32 hex characters in the index
REINDEX = "python -m data_shards.index {folder}"


@dataclass(frozen=True)
class ShardInfo:
    name: str  # relative to the index's folder (or URL prefix); never '..' or absolute
    samples: int
    bytes: int
    sha256: str
    # The per-sample records; None in indexes written before they were recorded.
    # offsets: samples + 1 byte positions in the tar: sample i (all its members, headers included)
    # occupies offsets[i]:offsets[i + 1], so a reader can seek to any sample.
    offsets: tuple[int, ...] | None = None
    keys: tuple[str, ...] | None = None  # sample i's key
    # sample_digest of bytes offsets[i]:offsets[i + 1]. The tar headers are part of those bytes, so
    # it proves the members' names and sizes as well as their content.
    blake3: tuple[str, ...] | None = None

    @property
    def has_records(self) -> bool:
        return self.offsets is not None and self.keys is not None and self.blake3 is not None


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

    def records_problem(self) -> str | None:
        """What is missing for a checked read of every sample, with the one-command fix; None when complete.

        Indexes packed before the per-sample records (offsets, keys, digests) existed lack them."""
        old = [shard.name for shard in self.shards if not shard.has_records]
        if not old:
            return None
        where = redact(self.location or "this index")
        if self.location is not None and "://" not in self.location and not self.location.startswith("pipe:"):
            fix = f"run `{REINDEX.format(folder=Path(self.location).parent)}` once"
        else:
            fix = f"run `{REINDEX.format(folder='SPLIT_DIR')}` on a local copy of the split and upload its {INDEX_NAME}"
        return (f"{where} has no per-sample records (offsets, keys, digests) for {len(old)} of {len(self.shards)} "
                f"shard(s), e.g. {old[0]}: it was packed by an older version. {fix} (it checks each shard's sha256, "
                "then records its samples; the shards are not changed), or re-pack")

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
    def load(cls, where: str | Path, settings: RemoteSettings | None = None) -> ShardIndex:
        """Loads from a split folder or an index file (a local path, or a URL that data_shards.remote
        opens with `settings`: the run's retries and timeout). ValueError names what is wrong."""
        text, location = _read_index_text(str(where), settings)
        shown = redact(str(where))
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:  # JSONDecodeError, too many digits; deep nesting
            raise ValueError(f"{shown}: not a valid shard index ({type(err).__name__}: {_first_line(err)})") from None
        return cls(**_parse_index(data, shown), location=location)


# ------------------------------------------------------------------ samples in a tar


def member_key(name: str) -> tuple[str, str]:
    """A tar member's sample key and extension, the webdataset way: 'val/a.target.png' -> ('val/a',
    'target.png'); the key keeps the folder, the extension starts at the first dot of the file name."""
    folder, _, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), extension


@dataclass
class TarSample:
    """A run of consecutive tar members sharing a key: bytes start:end of the tar, headers included."""

    key: str
    start: int
    end: int
    members: dict[str, bytes]  # extension -> content of each regular file (empty unless read)


def tar_samples(tar: tarfile.TarFile, read: bool = True) -> Iterator[TarSample]:
    """The samples of an open tar in stored order (webdataset's grouping). Every member counts for the
    byte ranges, so the ranges tile the archive; only regular files' contents are read, and only with
    `read` (a stream-mode tar must be read member by member, as it passes)."""
    current: TarSample | None = None
    for info in tar:
        key, extension = member_key(info.name)
        if current is not None and current.key != key:
            yield current
            current = None
        if current is None:
            current = TarSample(key, info.offset, info.offset, {})
        current.end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
        if read and info.isfile():
            current.members[extension] = tar.extractfile(info).read()
    if current is not None:
        yield current


def sample_members(data: bytes) -> TarSample:
    """The one sample that the bytes of one index range hold; ValueError when they hold something else."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            samples = list(tar_samples(tar))
    except (tarfile.TarError, EOFError) as err:
        raise ValueError(f"no whole sample here ({err})") from None
    if len(samples) != 1:
        keys = ", ".join(sample.key for sample in samples[:3])
        raise ValueError(f"the range holds {len(samples)} samples, not one ({keys or 'no member'})")
    return samples[0]


def sample_digest(data: bytes) -> bytes:
    """The digest recorded for a sample's bytes (BLAKE3: fast enough to check every read)."""
    return blake3.blake3(data).digest(length=DIGEST_BYTES)


def describe_shard(path: str | Path, name: str | None = None) -> ShardInfo:
    """A shard's index entry, read from the tar on disk: its headers, then its bytes once (the
    sha256 of the whole, the digest of each sample)."""
    path = Path(path)
    with open(path, "rb") as handle:
        with tarfile.open(fileobj=handle, mode="r:") as tar:
            samples = list(tar_samples(tar, read=False))
        offsets = (*(sample.start for sample in samples), samples[-1].end if samples else 0)
        handle.seek(0)
        whole = hashlib.sha256(_read_exactly(handle, offsets[0], path))
        digests = []
        for start, end in zip(offsets, offsets[1:]):
            data = _read_exactly(handle, end - start, path)
            whole.update(data)
            digests.append(sample_digest(data).hex())
        while chunk := handle.read(1 << 20):
            whole.update(chunk)
        size = handle.tell()
    return ShardInfo(name=name or path.name, samples=len(samples), bytes=size, sha256=whole.hexdigest(),
                     offsets=offsets, keys=tuple(sample.key for sample in samples), blake3=tuple(digests))


def _read_exactly(handle, count: int, path: Path) -> bytes:
    data = handle.read(count)
    if len(data) != count:
        raise ValueError(f"{path}: the tar ends inside a member (truncated)")
    return data


def reindex(folder: str | Path) -> Path:
    """Rewrites the index of a local split folder packed before the per-sample records existed. Each
    shard must still be the one packed (the index's size and sha256), so the records describe what was
    packed, not what a changed shard holds now."""
    index = ShardIndex.load(folder)
    base = Path(index.location).parent
    shards = []
    for shard in index.shards:
        path = base / shard.name
        try:
            found = describe_shard(path, shard.name)
        except (OSError, ValueError, tarfile.TarError) as err:
            raise ValueError(f"{path}: cannot read it ({err}); check the split with `restormer-verify`, "
                             "re-pack it") from err
        if (found.bytes, found.sha256) != (shard.bytes, shard.sha256):
            raise ValueError(f"{path}: {found.bytes} bytes, sha256 {found.sha256[:16]}...; the index says "
                             f"{shard.bytes} bytes, {shard.sha256[:16]}...: the shard changed since it was packed, "
                             "so its samples cannot be vouched for; restore it or re-pack this split")
        if found.samples != shard.samples:
            raise ValueError(f"{path}: {found.samples} samples in the tar but {shard.samples} in the index; "
                             "re-pack this split")
        shards.append(found)
    return replace(index, shards=tuple(shards)).save(base)


# ------------------------------------------------------------------ reading and checking index.json


def _read_index_text(where: str, settings: RemoteSettings | None) -> tuple[str, str]:
    shown = redact(where)
    if "://" in where or where.startswith("pipe:"):
        data, location = read_bytes(where, settings, most=MAX_INDEX_BYTES + 1), where
        if len(data) > MAX_INDEX_BYTES:
            raise ValueError(f"{shown}: larger than {MAX_INDEX_BYTES >> 20} MiB, more than any shard index "
                             "(about 80 bytes per sample); not an index, or split the data set")
    else:
        path = Path(where)
        if path.is_dir():
            path = path / INDEX_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no shard index here; a finished `restormer-pack` run writes "
                                    f"OUT/<split>/{INDEX_NAME} (an unfinished one leaves none)")
        with open(path, "rb") as handle:  # bounded: a device file (/dev/zero) reports no size
            data, location = handle.read(MAX_INDEX_BYTES + 1), str(path)
        if len(data) > MAX_INDEX_BYTES:
            raise ValueError(f"{path}: more than any shard index ({MAX_INDEX_BYTES >> 20} MiB, about 80 bytes "
                             "per sample); not an index, or split the data set")
    try:
        return data.decode("utf-8"), location
    except UnicodeDecodeError as err:
        raise ValueError(f"{shown}: not a valid shard index (not UTF-8 text: {err.reason} at byte {err.start})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:200]


def _kind(value) -> str:
    """How a JSON value is described in a message: its type and a short excerpt."""
    if value is None:
        return "null"
    if isinstance(value, (dict, list)):
        items = f"{len(value)} item" + ("" if len(value) == 1 else "s")
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {items}"
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(type(value), type(value).__name__)
    return f"{name} {json.dumps(value)[:40]}"


def _int(value, path: str, low: int = 0, high: int | None = None) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{path} must be an integer {bound}, got {_kind(value)}")
    return value


def _str(value, path: str, pattern: re.Pattern | None = None, rule: str = "") -> str:
    if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
        raise ValueError(f"{path} must be a string{rule}, got {_kind(value)}")
    return value


def _list(value, path: str, length: int | None = None) -> list:
    if not isinstance(value, list) or (length is not None and len(value) != length):
        wanted = f" of {length} items" if length is not None else ""
        raise ValueError(f"{path} must be a list{wanted}, got {_kind(value)}")
    return value


# Per-sample lists hold millions of items: checked in bulk, and item by item only to name the first bad one.


def _ints(values: list, path: str) -> tuple[int, ...]:
    if not (set(map(type, values)) <= {int} and (not values or 0 <= min(values) and max(values) < 1 << 63)):
        for i, value in enumerate(values):
            _int(value, f"{path}[{i}]", high=(1 << 63) - 1)
    return tuple(values)


def _text(value, path: str, longest: int | None = MAX_NAME_CHARS, shortest: int = 1) -> str:
    """Text that messages and logs may show as it is: printable (no newline, no terminal escape), of
    `shortest` to `longest` characters (None: any length)."""
    if not (isinstance(value, str) and value.isprintable()
            and shortest <= len(value) <= (len(value) if longest is None else longest)):
        size = f"{shortest} to {longest} characters" if longest is not None else "any length"
        raise ValueError(f"{path} must be printable text of {size}, got {_kind(value)}")
    return value


def _names(values: list, path: str) -> tuple[str, ...]:
    """Per-sample keys by _text's rule: millions of them, checked in bulk."""
    lengths = [len(value) for value in values] if set(map(type, values)) <= {str} else None
    if lengths is None or values and not (min(lengths) > 0 and max(lengths) <= MAX_NAME_CHARS
                                          and "".join(values).isprintable()):
        for i, value in enumerate(values):
            _text(value, f"{path}[{i}]")
    return tuple(values)


def _digests(values: list, path: str) -> tuple[str, ...]:
    if not (set(map(type, values)) <= {str} and set(map(len, values)) <= {2 * DIGEST_BYTES}
            and _HEX.fullmatch("".join(values))):
        for i, value in enumerate(values):
            _str(value, f"{path}[{i}]", _DIGEST, f" of {2 * DIGEST_BYTES} hex digits")
    return tuple(values)


def _object(value, path: str, required: set[str], optional: set[str] = frozenset()) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{path} must be an object, got {_kind(value)}")
    missing, unknown = sorted(required - set(value)), sorted(set(value) - required - optional)
    if missing or unknown:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + \
                ([f"unknown {', '.join(unknown[:5])}"] if unknown else [])
        raise ValueError(f"{path}: {'; '.join(parts)}")
    return value


def _size(value, path: str) -> tuple[int, int] | None:
    if value is None:
        return None
    height, width = _list(value, path, 2)
    return _int(height, f"{path}[0]", 1), _int(width, f"{path}[1]", 1)


_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_INPUT_NAME = re.compile(r"input(_[a-z0-9]+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile("[0-9a-f]*")
_DIGEST = re.compile(f"[0-9a-f]{{{2 * DIGEST_BYTES}}}")
_FORMAT = re.compile("png|npy")
_TOP = {"split", "shards", "total_samples", "inputs", "channels", "bit_depths", "format", "min_size", "median_size",
        "max_size", "source_images", "tile", "stride", "command", "version", "format_version"}
_SHARD = {"name", "samples", "bytes", "sha256"}
_RECORDS = {"offsets", "keys", "blake3"}


def _parse_index(data, where: str) -> dict:
    """ShardIndex's fields from decoded JSON, after checking every type and limit."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a shard index (the top level is {_kind(data)}, not an object)")
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: index format_version {_kind(data.get('format_version'))}, this code reads "
                         f"{FORMAT_VERSION}; re-pack with `restormer-pack`")
    _object(data, where, _TOP)
    shards = tuple(_parse_shard(entry, f"{where}: shards[{i}]")
                   for i, entry in enumerate(_list(data["shards"], f"{where}: shards")))
    seen: dict[str, int] = {}
    for i, shard in enumerate(shards):
        if shard.name in seen:
            raise ValueError(f"{where}: shards[{i}] '{shard.name}' is listed twice (also shards[{seen[shard.name]}]); "
                             "each shard may appear once: re-pack, or remove the duplicate entry")
        seen[shard.name] = i
    total = _int(data["total_samples"], f"{where}: total_samples")
    if total != sum(shard.samples for shard in shards):
        raise ValueError(f"{where}: total_samples is {total} but the shards hold {sum(s.samples for s in shards)}")
    bit_depths = tuple(_int(v, f"{where}: bit_depths[{i}]", 8, 16)
                       for i, v in enumerate(_list(data["bit_depths"], f"{where}: bit_depths")))
    inputs = tuple(_str(v, f"{where}: inputs[{i}]", _INPUT_NAME, " like 'input' or 'input_left'")
                   for i, v in enumerate(_list(data["inputs"], f"{where}: inputs")))
    return {
        "split": _text(data["split"], f"{where}: split"), "shards": shards, "total_samples": total,
        "inputs": inputs, "channels": _int(data["channels"], f"{where}: channels", 0, 4), "bit_depths": bit_depths,
        "format": _str(data["format"], f"{where}: format", _FORMAT, " 'png' or 'npy'"),
        **{name: _size(data[name], f"{where}: {name}") for name in ("min_size", "median_size", "max_size")},
        "source_images": _int(data["source_images"], f"{where}: source_images"),
        **{name: None if data[name] is None else _int(data[name], f"{where}: {name}", 1) for name in ("tile", "stride")},
        "command": _text(data["command"], f"{where}: command", longest=None, shortest=0),
        "version": _text(data["version"], f"{where}: version"),
    }


def _parse_shard(data, where: str) -> ShardInfo:
    _object(data, where, _SHARD, _RECORDS)
    name = data["name"]
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        shown = json.dumps(name)[:60] if isinstance(name, str) else _kind(name)
        raise ValueError(f"{where}: shard name {shown} is not allowed: a shard is named by a path inside the "
                         "index's folder, of letters, digits, '.', '_', '-' and '/' (no '..', no absolute path)")
    samples, size = _int(data["samples"], f"{where}.samples"), _int(data["bytes"], f"{where}.bytes")
    sha256 = _str(data["sha256"], f"{where}.sha256", _SHA256, " of 64 hex digits")
    if any(data.get(key) is None for key in _RECORDS):
        return ShardInfo(name=name, samples=samples, bytes=size, sha256=sha256)  # records_problem() says so
    offsets = _ints(_list(data["offsets"], f"{where}.offsets", samples + 1), f"{where}.offsets")
    steps = np.diff(np.asarray(offsets, dtype=np.int64))
    bad = np.flatnonzero((steps < 1) | (steps > MAX_SAMPLE_BYTES))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{where}: sample {i} spans bytes {offsets[i]}:{offsets[i + 1]}; a sample takes 1 to "
                         f"{MAX_SAMPLE_BYTES} bytes, in increasing order")
    if offsets[-1] > size:
        raise ValueError(f"{where}: the samples end at byte {offsets[-1]}, past the shard's {size} bytes")
    keys = _names(_list(data["keys"], f"{where}.keys", samples), f"{where}.keys")
    digests = _digests(_list(data["blake3"], f"{where}.blake3", samples), f"{where}.blake3")
    return ShardInfo(name=name, samples=samples, bytes=size, sha256=sha256, offsets=offsets, keys=keys, blake3=digests)


# ------------------------------------------------------------------ the command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m data_shards.index",
                                     description="Record each sample's byte offsets, key and digest in split indexes "
                                                 "packed without them. Each shard must still match the index's sha256; "
                                                 "the shards are not changed.")
    parser.add_argument("split", nargs="+", help="split folder(s) holding index.json and the shards")
    for split_folder in parser.parse_args(argv).split:
        try:
            print(f"wrote {reindex(split_folder)}")
        except (OSError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
