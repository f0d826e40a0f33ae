"""The index written next to the shards of one split: what streaming and verify rely on.

index.json holds the split's description, one entry per shard (name, samples, bytes, sha256) and
the size and BLAKE3 hash of the split's records file (data_shards.records): where each sample lies
(byte offsets), its key, and a digest of its bytes, so that every read can prove that it got the
sample the index describes. The records are memory mapped, so an index costs a process nothing per
sample until it reads that sample, and every process on a node shares one copy. A remote index's
records are fetched once per node (data_shards.node_copy).

Indexes of format 1 (before the records file) kept the records as JSON lists in each shard entry;
they are still read (into memory) and `python -m data_shards.index` rewrites them in this layout.

An index is untrusted input like the shards: `ShardIndex.load` checks every field's type and
limits, that shard names stay inside the index's folder or URL prefix, and the records file's hash
and bounds, before anything uses it.

This module is also the one place that knows how a tar groups into samples (`tar_samples`), and how
a sample's digest is computed (`sample_digest`).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import itertools
import json
import re
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import blake3
import numpy as np

from data_shards.codec import MAX_PIXELS
from data_shards.atomic import atomic_write
from data_shards.node_copy import node_copy
from data_shards.records import DIGEST_BYTES, MAX_NAME_CHARS, RecordTable, open_records
from data_shards.remote import RemoteSettings, read_bytes, redact

INDEX_NAME = "index.json"
RECORDS_NAME = "index.records"
FORMAT_VERSION = 2
OLD_FORMAT = 1  # records as JSON lists per shard: read, and rewritten by `python -m data_shards.index`
# index.json is read whole into memory: about 150 bytes per shard (10^5 shards: 15 MB); an old
# (format 1) one about 80 bytes per sample, so this admits ~10^7 samples in that format.
MAX_INDEX_BYTES = 1 << 30
# One sample is read whole into memory before its digest is checked, so an index range is at most the
# largest sample pack writes, and no index can make a loader worker allocate more. An image is at most
# MAX_PIXELS of 16-bit RGB: 6 bytes per pixel as npy (plus a 128-byte header) or PNG, whose rows add a
# filter byte each (at most one per pixel, for a one-pixel-wide image) and whose deflate stream adds
# under 0.01% for data it cannot compress. A sample holds a target and up to two inputs (dual-pixel)
# that large, plus a JSON member and tar headers (64 KiB is ample); pack refuses a larger one.
MAX_IMAGE_BYTES = 7 * MAX_PIXELS + MAX_PIXELS // 1024
MAX_SAMPLE_BYTES = 3 * MAX_IMAGE_BYTES + (64 << 10)  # 1.31 GiB
REINDEX = "python -m data_shards.index {folder}"


@dataclass(frozen=True, eq=False, slots=True)
class ShardRecords:
    """One shard's samples in a RecordTable (the split's, or its own): shard `shard` of the table,
    whose samples are the table's sample ids first .. first + samples - 1."""

    table: RecordTable
    shard: int
    first: int

    @property
    def samples(self) -> int:
        return int(self.table.counts[self.shard])

    @property
    def offsets(self) -> np.ndarray:
        at = self.first + self.shard
        return self.table.offsets[at:at + self.samples + 1]

    @property
    def digests(self) -> np.ndarray:
        return self.table.digests[self.first:self.first + self.samples]

    def keys(self) -> tuple[str, ...]:
        return self.table.keys(self.first, self.first + self.samples)

    def alone(self) -> RecordTable:
        """This shard's records as a table of their own (for writing them into another index)."""
        ends = self.table.key_end[self.first:self.first + self.samples]
        base = int(self.table.key_end[self.first - 1]) if self.first else 0
        return RecordTable(counts=np.array([self.samples], np.int64), offsets=np.asarray(self.offsets),
                           digests=np.asarray(self.digests), key_end=np.asarray(ends) - base,
                           key_text=np.asarray(self.table.key_text[base:int(ends[-1]) if len(ends) else base]))

    def __eq__(self, other) -> bool:
        return isinstance(other, ShardRecords) and np.array_equal(self.offsets, other.offsets) and \
            np.array_equal(self.digests, other.digests) and self.keys() == other.keys()

    __hash__ = None


@dataclass(frozen=True, slots=True)
class ShardInfo:
    name: str  # relative to the index's folder (or URL prefix); never '..' or absolute
    samples: int
    bytes: int
    sha256: str
    # Where each sample lies, its key and digest; None in indexes written before they were recorded.
    records: ShardRecords | None = None

    @property
    def has_records(self) -> bool:
        return self.records is not None

    # The records as values, for checks that compare them one by one (verify, tests).
    @property
    def offsets(self) -> tuple[int, ...] | None:
        """samples + 1 byte positions in the tar: sample i (all its members, headers included) occupies
        offsets[i]:offsets[i + 1], so a reader can seek to any sample."""
        return None if self.records is None else tuple(self.records.offsets.tolist())

    @property
    def keys(self) -> tuple[str, ...] | None:
        return None if self.records is None else self.records.keys()

    @property
    def blake3(self) -> tuple[str, ...] | None:
        """sample_digest of bytes offsets[i]:offsets[i + 1], in hex. The tar headers are part of those
        bytes, so it proves the members' names and sizes as well as their content."""
        return None if self.records is None else tuple(bytes(d).hex() for d in self.records.digests)


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
        base = str(Path(self.location).parent)  # names are relative paths of safe characters (_SHARD_NAME)
        return [f"{base}/{shard.name}" for shard in self.shards]

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

    def record_table(self) -> RecordTable:
        """Every sample's records, in index order: the loaded table itself when the shards are its own,
        in order (no copy), else their records joined."""
        problem = self.records_problem()
        if problem:
            raise ValueError(problem)
        records = [shard.records for shard in self.shards]
        table = records[0].table if records else None
        if table is not None and len(table.counts) == len(records) and all(
                r.table is table and r.shard == i for i, r in enumerate(records)):
            return table
        return RecordTable.concatenate([r.alone() for r in records])

    def to_json(self, records_bytes: int, records_blake3: str) -> str:
        data = asdict(self)
        data.pop("location")
        data["shards"] = [{"name": s.name, "samples": s.samples, "bytes": s.bytes, "sha256": s.sha256}
                          for s in self.shards]
        data["records"] = {"name": RECORDS_NAME, "bytes": records_bytes, "blake3": records_blake3}
        return json.dumps(data, indent=1, sort_keys=True) + "\n"

    def save(self, folder: str | Path) -> Path:
        """Writes folder/index.records, then folder/index.json, each atomically (temp name, then rename)."""
        records = Path(folder) / RECORDS_NAME
        # The .tmp names are the ones pack's cleanup of an interrupted run recognises.
        with atomic_write(records, records.with_name(records.name + ".tmp")) as tmp:
            size, digest = self.record_table().write(tmp)
        target = Path(folder) / INDEX_NAME
        with atomic_write(target, target.with_name(target.name + ".tmp")) as tmp:
            tmp.write_text(self.to_json(size, digest), encoding="utf-8")
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
        fields = _parse_index(data, shown)
        names, samples, sizes, hashes, records = fields["shards"]
        if data["format_version"] == FORMAT_VERSION:
            table = _open_records(_parse_records(data, shown), samples, sizes, location, shown,
                                  settings or RemoteSettings())
            records = map(ShardRecords, itertools.repeat(table), range(len(names)), _firsts(table.counts))
        fields["shards"] = tuple(map(ShardInfo, names, samples, sizes, hashes, records))
        return cls(**fields, location=location)


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
            digests.append(sample_digest(data))
        while chunk := handle.read(1 << 20):
            whole.update(chunk)
        size = handle.tell()
    table = RecordTable.from_lists([len(samples)], offsets, [sample.key for sample in samples], digests)
    return ShardInfo(name=name or path.name, samples=len(samples), bytes=size, sha256=whole.hexdigest(),
                     records=ShardRecords(table, 0, 0))


def _read_exactly(handle, count: int, path: Path) -> bytes:
    data = handle.read(count)
    if len(data) != count:
        raise ValueError(f"{path}: the tar ends inside a member (truncated)")
    return data


def reindex(folder: str | Path) -> Path:
    """Rewrites the index of a local split folder in the current layout. An index that has the
    per-sample records keeps them (format 1's JSON lists move into the records file); one packed
    before they existed gets them from its shards, each of which must still be the one packed (the
    index's size and sha256), so the records describe what was packed, not what a changed shard
    holds now."""
    index = ShardIndex.load(folder)
    base = Path(index.location).parent
    if index.records_problem() is None:
        return index.save(base)
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
_SHARD_NAMES = re.compile(f"({_SHARD_NAME.pattern})(\n({_SHARD_NAME.pattern}))*")  # several, one a line
_INPUT_NAME = re.compile(r"input(_[a-z0-9]+)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile("[0-9a-f]*")
_DIGEST = re.compile(f"[0-9a-f]{{{2 * DIGEST_BYTES}}}")
_FORMAT = re.compile("png|npy")
_TOP = {"split", "shards", "total_samples", "inputs", "channels", "bit_depths", "format", "min_size", "median_size",
        "max_size", "source_images", "tile", "stride", "command", "version", "format_version"}
_SHARD = {"name", "samples", "bytes", "sha256"}
_RECORDS = {"offsets", "keys", "blake3"}  # format 1's per-sample lists in each shard entry
_RECORDS_FILE = {"name", "bytes", "blake3"}
_BLAKE3 = re.compile(r"[0-9a-f]{64}")


def _parse_index(data, where: str) -> dict:
    """ShardIndex's fields from decoded JSON, after checking every type and limit."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}: not a shard index (the top level is {_kind(data)}, not an object)")
    version = data.get("format_version")
    if version not in (OLD_FORMAT, FORMAT_VERSION) or isinstance(version, bool):
        raise ValueError(f"{where}: index format_version {_kind(version)}, this code reads {OLD_FORMAT} and "
                         f"{FORMAT_VERSION}; re-pack with `restormer-pack`")
    _object(data, where, _TOP | ({"records"} if version == FORMAT_VERSION else set()))
    shard_fields = set() if version == FORMAT_VERSION else _RECORDS
    entries = _list(data["shards"], f"{where}: shards")
    shards = _plain_shards(entries) if version == FORMAT_VERSION else None
    if shards is None:  # format 1, or an entry the bulk check refuses: entry by entry, naming the first bad one
        parsed = [_parse_shard(entry, f"{where}: shards[{i}]", shard_fields) for i, entry in enumerate(entries)]
        shards = ([s.name for s in parsed], [s.samples for s in parsed], [s.bytes for s in parsed],
                  [s.sha256 for s in parsed], [s.records for s in parsed])
    names, samples = shards[0], shards[1]
    if len(set(names)) != len(names):
        seen: dict[str, int] = {}
        for i, name in enumerate(names):
            if name in seen:
                raise ValueError(f"{where}: shards[{i}] '{name}' is listed twice (also shards[{seen[name]}]); "
                                 "each shard may appear once: re-pack, or remove the duplicate entry")
            seen[name] = i
    total = _int(data["total_samples"], f"{where}: total_samples")
    if total != sum(samples):
        raise ValueError(f"{where}: total_samples is {total} but the shards hold {sum(samples)}")
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


def _plain_shards(entries: list) -> tuple[list, list, list, list, list] | None:
    """Format 2's shard entries checked in bulk (10^5 of them load in a fraction of a second): their
    names, samples, bytes, sha256s and records (None: in the records file); None when any is not as
    _parse_shard would accept it, so that it names the first bad one."""
    if not all(type(entry) is dict and entry.keys() == _SHARD for entry in entries):
        return None
    names, samples, sizes, hashes = ([entry[field] for entry in entries] for field in ("name", "samples", "bytes", "sha256"))
    if not (set(map(type, names)) <= {str} and _SHARD_NAMES.fullmatch("\n".join(names))
            and set(map(type, samples + sizes)) <= {int} and min(samples + sizes, default=0) >= 0
            and set(map(type, hashes)) <= {str} and set(map(len, hashes)) <= {64} and _HEX.fullmatch("".join(hashes))):
        return None
    return names, samples, sizes, hashes, [None] * len(names)


def _parse_shard(data, where: str, records: set[str]) -> ShardInfo:
    """A shard entry; `records`: the per-sample lists it may hold (format 1), else none."""
    _object(data, where, _SHARD, records)
    name = data["name"]
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        shown = json.dumps(name)[:60] if isinstance(name, str) else _kind(name)
        raise ValueError(f"{where}: shard name {shown} is not allowed: a shard is named by a path inside the "
                         "index's folder, of letters, digits, '.', '_', '-' and '/' (no '..', no absolute path)")
    samples, size = _int(data["samples"], f"{where}.samples"), _int(data["bytes"], f"{where}.bytes")
    sha256 = _str(data["sha256"], f"{where}.sha256", _SHA256, " of 64 hex digits")
    if not records or any(data.get(key) is None for key in _RECORDS):
        return ShardInfo(name=name, samples=samples, bytes=size, sha256=sha256)  # format 2, or records_problem()
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
    table = RecordTable.from_lists([samples], offsets, keys, [bytes.fromhex(d) for d in digests])
    return ShardInfo(name=name, samples=samples, bytes=size, sha256=sha256, records=ShardRecords(table, 0, 0))


def _parse_records(data: dict, where: str) -> dict:
    """Format 2's records entry: the records file's name (beside index.json), size and BLAKE3 hash."""
    entry = _object(data["records"], f"{where}: records", _RECORDS_FILE)
    name = entry["name"]
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
        raise ValueError(f"{where}: records name {_kind(name)} is not allowed: a file beside the index, of letters, "
                         "digits, '.', '_', '-' and '/'")
    return {"name": name, "bytes": _int(entry["bytes"], f"{where}: records.bytes"),
            "blake3": _str(entry["blake3"], f"{where}: records.blake3", _BLAKE3, " of 64 hex digits")}


def _firsts(counts: np.ndarray) -> list[int]:
    """Each shard's first sample id."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist() if len(counts) else []


def _open_records(entry: dict, samples: list[int], sizes: list[int], location: str, shown: str,
                  settings: RemoteSettings) -> RecordTable:
    """The records file that index.json names, mapped once it is checked against the index; a remote
    one through this node's copy."""
    if location.startswith("pipe:"):
        raise ValueError(f"{shown}: an index read from a command cannot locate its records file "
                         f"({entry['name']}); give the index's path or URL")
    if "://" in location:
        url = f"{location.rsplit('/', 1)[0]}/{entry['name']}"
        path, named = node_copy(url, entry["bytes"], entry["blake3"], settings), f"{redact(url)} (copied to {{}})"
        named = named.format(path)
    else:
        path = Path(location).parent / entry["name"]
        named = str(path)
        if not path.is_file():
            raise ValueError(f"{named}: missing; index.json needs its records file beside it: copy it along, or re-pack")
    if max(samples + sizes, default=0) >= 1 << 62:
        huge = next(i for i, (count, size) in enumerate(zip(samples, sizes)) if max(count, size) >= 1 << 62)
        raise ValueError(f"{shown}: shards[{huge}] claims {samples[huge]} samples in {sizes[huge]} bytes, more than "
                         "any records file can describe; re-pack")
    return open_records(path, np.array(samples, dtype=np.int64), np.array(sizes, dtype=np.int64), entry["bytes"],
                        entry["blake3"], named, MAX_SAMPLE_BYTES)


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
