"""Open one shard, wherever it lives, as a binary file positioned at a byte offset.

Sources (by URL form):
  /path/shard.tar, file:///path/shard.tar    a local file, seeked to the offset
  http://host/shard.tar, https://...          an HTTP GET with a Range header for the offset
                                              (a server that ignores Range is read and the head
                                              discarded); user:password@ in the URL is sent as
                                              Basic authentication, never printed
  s3://bucket/key                             boto3 GetObject with a Range; credentials, region,
                                              profile and endpoint come from the usual AWS
                                              environment/config (AWS_ACCESS_KEY_ID,
                                              AWS_SECRET_ACCESS_KEY, AWS_PROFILE, AWS_ENDPOINT_URL)
  pipe:CMD                                    webdataset's convention: CMD writes the shard to
                                              stdout; the first `offset` bytes are read and dropped

`open_shard(url, offset, length=N)` reads one byte range (a sample): remote sources ask for just
those bytes (a bounded Range), local and cached files are returned seekable as they are.

Contract of a remote read (http, s3, pipe):
- A failure that may pass (connection refused or dropped, timeout, HTTP 408/429/5xx, S3 throttling,
  a stream that ends before the shard's known size) re-opens the source at the byte reached and
  carries on, after a pause that doubles from `backoff_s` (with jitter, capped at 30 s). The bound
  `retries` counts failures in a row; 1 MiB read after a failure starts a new count, so a long shard
  survives occasional drops while a server that trickles a few bytes per connection is given up.
- Every connect and every read blocks at most `timeout_s`, so a stalled server is a failure, not a hang.
- A ranged answer must be the range asked for (http 206 Content-Range, S3 ContentRange): other bytes
  (from 0, a wider range, no header) fail the read like a dropped connection. A 200 to a Range
  request has its head discarded, never taken for the range.
- A failure that will not pass (missing object, refused credentials, a size unlike the index's), or
  `retries` exhausted, raises ShardReadError naming the shard (credentials redacted) and the cause:
  the stream skips the shard, counts it and names it. Bytes are never silently lost: a read that
  ends short of the known size (the index's, else the server's) is an error.
- Every message that shows a URL goes through `redact`.

Optional cache (settings.cache_dir): whole shards in its own subfolder, for data read many epochs;
it deletes only the copies it wrote (see ShardCache).

One room each: settings (RemoteSettings and its rules), text (redact, printable), errors (ShardReadError
and the bounds of a read), reader (the resuming reader), local, http_source, s3_source, pipe_source,
uncached (which source a URL names, read without the cache) and cache (ShardCache).
"""

from __future__ import annotations

from typing import BinaryIO

from data_shards.remote.cache import CACHE_SUBFOLDER, ShardCache, cache_folder_problem, folder_overlap
from data_shards.remote.errors import ShardReadError, check_range
from data_shards.remote.local import local_path
from data_shards.remote.settings import DEFAULT_RETRIES, DEFAULT_TIMEOUT_S, RemoteSettings, settings_problem
from data_shards.remote.text import printable, redact
from data_shards.remote.uncached import open_uncached, read_bytes

__all__ = ["CACHE_SUBFOLDER", "DEFAULT_RETRIES", "DEFAULT_TIMEOUT_S", "RemoteSettings", "ShardCache", "ShardReadError",
           "cache_folder_problem", "check_range", "folder_overlap", "open_shard", "open_uncached", "printable",
           "read_bytes", "redact", "settings_problem"]


def open_shard(url: str, offset: int = 0, *, length: int | None = None, size: int | None = None,
               sha256: str | None = None, settings: RemoteSettings | None = None) -> BinaryIO:
    """A readable binary file positioned at byte `offset` of the shard at `url`; the caller closes it.

    `length`: the caller reads at most this many bytes (e.g. one sample's byte range). A remote
    source then requests just that range and ends there, instead of sending the shard's rest; a
    local or cached file is returned as it is (seekable, on to the shard's end).
    `size` and `sha256` (from the index, when known) make short reads and changed shards errors: a
    read to the end needs the whole shard at the index's size, a range needs only its own bytes (so
    a truncated shard still serves the samples it holds). sha256 is checked on cached copies.
    """
    settings = settings or RemoteSettings()
    check_range(url, offset, length, size)
    if local_path(url) is None and settings.cache_dir is not None:
        return ShardCache(settings).open(url, offset, size=size, sha256=sha256)
    return open_uncached(url, offset, length=length, size=size, settings=settings)
