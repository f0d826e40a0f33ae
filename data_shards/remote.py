"""Opens the bytes of a shard by its URL: local paths and file:// (seekable), 'pipe:CMD' (forward only)."""

from __future__ import annotations

import subprocess
from typing import BinaryIO


def open_shard(url: str, offset: int = 0, *, length: int | None = None) -> BinaryIO:
    """A binary file object positioned at byte `offset` of the shard; the caller closes it.

    `length`: the caller reads at most this many bytes (one sample), so a remote source may fetch
    just that range; local files and pipes ignore it.

    'pipe:CMD' runs CMD in a shell and reads its stdout, discarding the first `offset` bytes (a pipe
    cannot seek: random access into such a shard costs a read of everything before the sample).
    """
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[len("pipe:"):], shell=True, stdout=subprocess.PIPE)
        stream = process.stdout
        while offset > 0:
            chunk = stream.read(min(offset, 1 << 20))
            if not chunk:
                break  # shorter than offset: the reader sees the end of data and reports the sample
            offset -= len(chunk)
        return stream
    handle = open(url[len("file://"):] if url.startswith("file://") else url, "rb")
    handle.seek(offset)
    return handle

