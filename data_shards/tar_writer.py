"""Writes samples into size-limited tar shards, byte-identical for identical input.

Every shard is written under a `.tmp` name and renamed only once it is complete, so a killed pack
never leaves a truncated file that looks like a finished shard. Its index entry (sizes, sha256, and
each sample's offsets, key and digest) is read back from the finished file by
data_shards.index.describe_shard, the same function that indexes older folders.
"""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

from data_shards.atomic import replace_durably
from data_shards.index import ShardInfo, describe_shard

_BLOCK = tarfile.BLOCKSIZE


def tar_size(members: list[tuple[str, bytes]]) -> int:
    """Bytes the members take in a tar: one header block each plus data padded to 512 bytes."""
    return sum(_BLOCK + -(-len(data) // _BLOCK) * _BLOCK for _, data in members)


class ShardWriter:
    """Splits a sample stream into `<prefix>-000000.tar`, `<prefix>-000001.tar`, ... in `folder`."""

    def __init__(self, folder: Path, prefix: str, max_samples: int, max_bytes: int):
        self.folder, self.prefix = folder, prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        self._bytes = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        """members: (extension, data) pairs, e.g. ("target.png", b"...")."""
        size = tar_size(members)
        if self._tar is not None and (self._count >= self.max_samples or self._bytes + size > self.max_bytes):
            self._finish()
        if self._tar is None:
            self._open()
        for extension, data in members:
            info = tarfile.TarInfo(f"{key}.{extension}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return self.shards

    def abort(self) -> None:
        """Closes and deletes the shard being written (used when a strict pack stops)."""
        if self._tar is not None:
            self._tar.close()
            self._tmp_path().unlink(missing_ok=True)
            self._tar = None

    def _name(self) -> str:
        return f"{self.prefix}-{len(self.shards):06d}.tar"

    def _tmp_path(self) -> Path:
        return self.folder / (self._name() + ".tmp")

    def _open(self) -> None:
        self._tar = tarfile.open(self._tmp_path(), "w", format=tarfile.PAX_FORMAT)
        self._count = self._bytes = 0

    def _finish(self) -> None:
        self._tar.close()
        self._tar = None
        tmp, final = self._tmp_path(), self.folder / self._name()
        replace_durably(tmp, final)
        self.shards.append(describe_shard(final))
