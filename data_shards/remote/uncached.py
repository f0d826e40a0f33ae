"""Which source a URL names, and a read through it without the cache."""

from __future__ import annotations

import io
from typing import BinaryIO

from data_shards.remote.errors import ShardReadError
from data_shards.remote.http_source import HttpSource
from data_shards.remote.local import local_path, open_local
from data_shards.remote.pipe_source import PipeSource
from data_shards.remote.reader import CHUNK, ResumingReader, Source
from data_shards.remote.s3_source import S3Source
from data_shards.remote.settings import RemoteSettings


def open_uncached(url: str, offset: int = 0, *, length: int | None = None, size: int | None = None,
                  settings: RemoteSettings | None = None) -> BinaryIO:
    """open_shard without the cache: a local file, or a retrying remote stream."""
    settings = settings or RemoteSettings()
    path = local_path(url)
    end = offset + length if length is not None else None
    if path is not None:
        return open_local(url, path, offset, size, end)
    source = _remote_source(url, settings)
    return io.BufferedReader(ResumingReader(url, source, offset, end, size, settings), buffer_size=CHUNK)


def read_bytes(url: str, settings: RemoteSettings | None = None, most: int | None = None) -> bytes:
    """The whole object at `url` (e.g. an index.json), through the same sources and retries; at most
    `most` bytes of it when given (a caller bounding what it reads into memory)."""
    chunks, count = [], 0
    with open_uncached(url, settings=settings) as stream:
        while most is None or count < most:
            chunk = stream.read(CHUNK if most is None else min(CHUNK, most - count))
            if not chunk:
                break
            chunks.append(chunk)
            count += len(chunk)
    return b"".join(chunks)


def _remote_source(url: str, settings: RemoteSettings) -> Source:
    if url.startswith("pipe:"):
        return PipeSource(url[len("pipe:"):], settings.timeout_s)
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        return HttpSource.parse(url, settings)
    if scheme == "s3":
        return S3Source.parse(url, settings)
    raise ShardReadError(url, f"unsupported scheme '{scheme}://'; use a local path, file://, http(s)://, "
                              "s3:// or pipe:COMMAND")
