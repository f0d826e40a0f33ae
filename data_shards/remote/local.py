"""Local shards: a path or file:// URL, opened and seeked."""

from __future__ import annotations

import os
import urllib.parse
from pathlib import Path
from typing import BinaryIO

from data_shards.remote.errors import ShardReadError, size_problem


def local_path(url: str) -> Path | None:
    """The file a URL names, or None for a remote one."""
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def open_local(url: str, path: Path, offset: int, size: int | None, end: int | None = None) -> BinaryIO:
    try:
        stream = open(path, "rb")  # noqa: SIM115 (the caller owns it)
    except OSError as err:
        raise ShardReadError(url, f"{type(err).__name__}: {err.strerror or err}") from None
    problem = size_problem(os.fstat(stream.fileno()).st_size, offset, end, size)
    if problem:
        stream.close()
        raise ShardReadError(url, f"{problem}; copy it again or re-pack")
    return positioned(url, stream, offset)


def positioned(url: str, stream: BinaryIO, offset: int) -> BinaryIO:
    actual = os.fstat(stream.fileno()).st_size
    if offset > actual:
        stream.close()
        raise ShardReadError(url, f"offset {offset} is past the end of the file ({actual} bytes)")
    stream.seek(offset)
    return stream
