"""The per-sample records of a split in one binary file, memory mapped read-only (`index.records`).

For every sample: where it lies in its shard, its 16-byte BLAKE3 digest, and its key. index.json
lists the shards and the records file's size and BLAKE3 hash; the file holds, little-endian:

  header   8 bytes b"RSTREC01", then uint64 samples, shards, key bytes
  offsets  int64 (samples + shards,): shard by shard, its samples + 1 byte positions; sample j of
           a shard occupies offsets[j]:offsets[j + 1] of it (all its members, tar headers included)
  digests  uint8 (samples, 16): sample_digest of each sample's bytes
  key_end  int64 (samples,): key i is key_text[key_end[i - 1]:key_end[i]] (key_end[-1] = 0)
  keys     uint8 (key bytes,): the UTF-8 keys, one after another

32 bytes per sample plus its key, 8 per shard. Every process on a node maps the same file, so the
page cache holds one copy for all of them; nothing per sample is copied into a process. Opening a
file checks it once, in one sequential read that never holds more than a chunk: its size and
header, its hash against the index's, and every field's bounds (vectorised; a key is looked at as
text only when its chunk is not plain printable ASCII). A file that passed is remembered by
(device, inode, size, mtime, ctime) for the rest of the process, so a second load (the config check, then
each progressive stage) costs no second pass.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import blake3
import numpy as np

from data_shards.remote import printable

MAGIC = b"RSTREC01"
HEADER_BYTES = 32
DIGEST_BYTES = 16  # BLAKE3 output per sample: 128 bits
MAX_NAME_CHARS = 255  # a key, the split's name, the version: printable, at most this long
_CHUNK = 1 << 18  # items per vectorised check, and a bounded read buffer (2 MiB of int64)


@dataclass(frozen=True, eq=False)
class RecordTable:
    """The records of consecutive shards: arrays (memory mapped, or in memory when built in code)."""

    counts: np.ndarray  # int64 (shards,): samples per shard
    offsets: np.ndarray  # int64 (samples + shards,)
    digests: np.ndarray  # uint8 (samples, DIGEST_BYTES)
    key_end: np.ndarray  # int64 (samples,)
    key_text: np.ndarray  # uint8
    path: str | None = None  # the mapped file, for pickling into a spawned worker
    identity: tuple | None = None  # the file's (device, inode, size, mtime, ctime) when it was checked

    @property
    def samples(self) -> int:
        return len(self.key_end)

    def key(self, i: int) -> str:
        return bytes(self.key_text[self.key_end[i - 1] if i else 0:self.key_end[i]]).decode("utf-8")

    def keys(self, first: int, stop: int) -> tuple[str, ...]:
        ends = self.key_end[first:stop].tolist()
        text = bytes(self.key_text[self.key_end[first - 1] if first else 0:ends[-1] if ends else 0])
        base = int(self.key_end[first - 1]) if first else 0
        starts = [base, *ends[:-1]]
        return tuple(text[a - base:b - base].decode("utf-8") for a, b in zip(starts, ends))

    @classmethod
    def from_lists(cls, counts, offsets, keys, digests) -> RecordTable:
        """Built in memory: per shard its samples + 1 offsets, each sample's key (str) and digest (bytes)."""
        encoded = [key.encode("utf-8") for key in keys]
        return cls(counts=np.asarray(counts, dtype=np.int64), offsets=np.asarray(offsets, dtype=np.int64),
                   digests=np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(-1, DIGEST_BYTES),
                   key_end=np.cumsum([len(key) for key in encoded], dtype=np.int64),
                   key_text=np.frombuffer(b"".join(encoded), dtype=np.uint8))

    @classmethod
    def concatenate(cls, tables: list[RecordTable]) -> RecordTable:
        if not tables:
            return cls.from_lists([], [], [], [])
        ends, base = [], 0
        for table in tables:
            ends.append(table.key_end + base)
            base += int(table.key_end[-1]) if table.samples else 0
        return cls(counts=np.concatenate([t.counts for t in tables]), offsets=np.concatenate([t.offsets for t in tables]),
                   digests=np.concatenate([t.digests for t in tables]), key_end=np.concatenate(ends),
                   key_text=np.concatenate([t.key_text for t in tables]))

    def write(self, path: Path) -> tuple[int, str]:
        """Writes the file; returns its size and BLAKE3 hash (hex) for index.json."""
        digest = blake3.blake3()
        header = MAGIC + np.array([self.samples, len(self.counts), len(self.key_text)], "<u8").tobytes()
        with open(path, "wb") as handle:
            for part in (header, self.offsets.astype("<i8", copy=False), self.digests,
                         self.key_end.astype("<i8", copy=False), self.key_text):
                data = part if isinstance(part, bytes) else np.ascontiguousarray(part).reshape(-1).view(np.uint8)
                digest.update(data)
                handle.write(data)
        return os.path.getsize(path), digest.hexdigest()

    def __reduce__(self):
        # A mapped table crosses into a spawned loader worker as its path: the worker maps the same
        # file (shared pages) instead of unpickling a private copy of every array.
        if self.path is None:
            return RecordTable, (self.counts, self.offsets, self.digests, self.key_end, self.key_text)
        return _reopen, (self.path, self.identity, self.counts)


def layout(samples: int, shards: int, key_bytes: int) -> dict[str, tuple[int, int]]:
    """Each section's (byte offset, byte count) in the file."""
    sections, at = {}, HEADER_BYTES
    for name, size in (("offsets", 8 * (samples + shards)), ("digests", DIGEST_BYTES * samples),
                       ("key_end", 8 * samples), ("keys", key_bytes)):
        sections[name] = (at, size)
        at += size
    return sections


def file_size(samples: int, shards: int, key_bytes: int) -> int:
    at, size = layout(samples, shards, key_bytes)["keys"]
    return at + size


_OPENED: dict[tuple, RecordTable] = {}  # (path identity, hash, shard sizes) -> a table checked in this process


def open_records(path: Path, counts: np.ndarray, shard_bytes: np.ndarray, size: int, hexdigest: str,
                 shown: str, max_sample: int) -> RecordTable:
    """Maps a records file after checking it against index.json (its size, hash, the shards' sample
    counts and byte sizes) and every field's bounds (a sample takes 1 to `max_sample` bytes);
    ValueError names the first problem. `shown` names the file in messages."""
    with open(path, "rb") as handle:  # checked and mapped through this handle: one file, even if replaced meanwhile
        identity = _identity(handle)
        remembered = (identity, hexdigest, counts.tobytes(), shard_bytes.tobytes())
        if remembered in _OPENED:
            return _OPENED[remembered]
        if identity[2] != size:
            raise ValueError(f"{shown}: {identity[2]} bytes, the index says {size}: truncated or replaced since it "
                             "was written; copy it again, or re-pack")
        header = handle.read(HEADER_BYTES)
        if len(header) < HEADER_BYTES or header[:8] != MAGIC:
            raise ValueError(f"{shown}: not a records file (no {MAGIC.decode()} header); re-pack")
        samples, shards, key_bytes = (int(v) for v in np.frombuffer(header[8:], "<u8"))
        if (samples, shards) != (int(counts.sum()), len(counts)) or file_size(samples, shards, key_bytes) != size:
            raise ValueError(f"{shown}: records of {samples} samples in {shards} shards ({size} bytes), the index "
                             f"lists {int(counts.sum())} samples in {len(counts)} shards; re-pack")
        plain = _Check(handle, shown, counts, shard_bytes, layout(samples, shards, key_bytes), hexdigest,
                       max_sample).run(header)
        table = _map(handle, path, counts, samples, shards, key_bytes, identity)
    if not plain:
        _text_keys(table, shown)
    _OPENED[remembered] = table
    return table


def _map(handle, path, counts: np.ndarray, samples: int, shards: int, key_bytes: int, identity: tuple) -> RecordTable:
    sections = layout(samples, shards, key_bytes)

    def section(name, dtype, shape):
        at, count = sections[name]
        if count == 0:
            return np.zeros(shape, dtype)
        return np.memmap(handle, dtype=dtype, mode="r", offset=at, shape=shape)

    return RecordTable(counts=counts, offsets=section("offsets", "<i8", (samples + shards,)),
                       digests=section("digests", np.uint8, (samples, DIGEST_BYTES)),
                       key_end=section("key_end", "<i8", (samples,)), key_text=section("keys", np.uint8, (key_bytes,)),
                       path=str(path), identity=identity)


def _identity(handle) -> tuple[int, ...]:
    stat = os.fstat(handle.fileno())
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _reopen(path: str, identity: tuple, counts: np.ndarray) -> RecordTable:
    with open(path, "rb") as handle:
        if _identity(handle) != identity:
            raise ValueError(f"{path}: the records file changed after the index was loaded; restart the run")
        samples, shards, key_bytes = (int(v) for v in np.frombuffer(handle.read(HEADER_BYTES)[8:], "<u8"))
        return _map(handle, path, counts, samples, shards, key_bytes, identity)


class _Check:
    """One sequential pass over the file: hashes every byte, checks each section's bounds as it passes."""

    def __init__(self, handle, shown: str, counts: np.ndarray, shard_bytes: np.ndarray, sections: dict,
                 hexdigest: str, max_sample: int):
        self.handle, self.shown, self.sections, self.hexdigest = handle, shown, sections, hexdigest
        self.max_sample = max_sample
        self.counts, self.shard_bytes = counts, shard_bytes
        self.hash = blake3.blake3(max_threads=blake3.blake3.AUTO)

    def run(self, header: bytes) -> bool:
        """Returns whether every key is plain printable ASCII of at most MAX_NAME_CHARS bytes; the others
        are checked as text (`text_keys`) once the hash has proven the file."""
        self.hash.update(header)
        self._offsets()
        for _ in self._read("digests", np.uint8, 16 * _CHUNK):
            pass
        plain = self._key_ends()
        for values in self._read("keys", np.uint8, 8 * _CHUNK):
            plain = plain and bool(((values >= 0x20) & (values < 0x7F)).all())
        if self.hash.hexdigest() != self.hexdigest:
            raise ValueError(f"{self.shown}: its BLAKE3 hash differs from the one index.json records: the records "
                             "do not belong to this index (changed, or mixed with another pack); re-pack")
        return plain

    def _read(self, name: str, dtype, chunk: int):
        """The section's values, chunk by chunk, each hashed as it is read."""
        at, count = self.sections[name]
        self.handle.seek(at)
        itemsize = np.dtype(dtype).itemsize
        done = 0
        while done < count:
            data = self.handle.read(min(chunk * itemsize, count - done))
            if not data:
                raise ValueError(f"{self.shown}: ends inside its {name} (truncated); copy it again, or re-pack")
            self.hash.update(data)
            done += len(data)
            yield np.frombuffer(data, dtype)

    def _offsets(self) -> None:
        """Per shard: offsets rising by 1 to self.max_sample, from >= 0 to at most the shard's size."""
        firsts = np.concatenate([[0], np.cumsum(self.counts + 1)])[:-1]  # where each shard's offsets start
        lasts = firsts + self.counts
        seen, previous = 0, 0
        for values in self._read("offsets", "<i8", _CHUNK):
            stop = seen + len(values)
            steps = np.diff(values, prepend=previous)
            starts = np.zeros(len(values), bool)  # a shard's first offset: no step into it
            shard_first = np.searchsorted(firsts, seen)
            starts[firsts[shard_first:np.searchsorted(firsts, stop)] - seen] = True
            bad = np.flatnonzero(~starts & ((steps < 1) | (steps > self.max_sample)))
            if bad.size:
                s = int(np.searchsorted(firsts, seen + bad[0], side="right")) - 1
                j = seen + int(bad[0]) - int(firsts[s]) - 1
                raise ValueError(f"{self.shown}: shards[{s}] sample {j} spans bytes {int(values[bad[0]] - steps[bad[0]])}:"
                                 f"{int(values[bad[0]])}; a sample takes 1 to {self.max_sample} bytes, in increasing order; "
                                 "re-pack")
            if (values[starts] < 0).any():
                raise ValueError(f"{self.shown}: a shard starts at a negative byte offset; re-pack")
            ending = np.arange(np.searchsorted(lasts, seen), np.searchsorted(lasts, stop))
            over = ending[values[lasts[ending] - seen] > self.shard_bytes[ending]]
            if over.size:
                s = int(over[0])
                raise ValueError(f"{self.shown}: shards[{s}]'s samples end at byte {int(values[lasts[s] - seen])}, past "
                                 f"the shard's {int(self.shard_bytes[s])} bytes; re-pack")
            seen, previous = stop, int(values[-1])

    def _key_ends(self) -> bool:
        """key_end rising by 1 to 4 * MAX_NAME_CHARS bytes (UTF-8) up to the keys' length. Returns whether
        every key is at most MAX_NAME_CHARS bytes (a plain-ASCII key is then short enough as it is)."""
        previous, short = 0, True
        for values in self._read("key_end", "<i8", _CHUNK):
            steps = np.diff(values, prepend=previous)
            bad = np.flatnonzero((steps < 1) | (steps > 4 * MAX_NAME_CHARS))
            if bad.size:
                raise ValueError(f"{self.shown}: a key of {int(steps[bad[0]])} bytes; keys take 1 to "
                                 f"{4 * MAX_NAME_CHARS} bytes (1 to {MAX_NAME_CHARS} characters); re-pack")
            short = short and int(steps.max()) <= MAX_NAME_CHARS
            previous = int(values[-1])
        if previous != self.sections["keys"][1]:
            raise ValueError(f"{self.shown}: the keys end at byte {previous} of {self.sections['keys'][1]}; re-pack")
        return short


def _text_keys(table: RecordTable, shown: str) -> None:
    """The slow path, for keys that are not all plain ASCII: each decoded and checked as text, a
    bounded chunk at a time."""
    for first in range(0, table.samples, _CHUNK // 16):
        stop = min(table.samples, first + _CHUNK // 16)
        try:
            keys = table.keys(first, stop)
        except UnicodeDecodeError as err:
            raise ValueError(f"{shown}: a key among samples {first}..{stop - 1} is not UTF-8 ({err.reason}); re-pack") from None
        for i, key in enumerate(keys):
            if not key.isprintable() or len(key) > MAX_NAME_CHARS:
                raise ValueError(f"{shown}: key {first + i} ({printable(key[:40])}) is not printable text of 1 to "
                                 f"{MAX_NAME_CHARS} characters; re-pack")
