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
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import io
import os
import random
import re
import select
import signal
import stat
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import BinaryIO, Protocol

__all__ = ["CACHE_SUBFOLDER", "RemoteSettings", "ShardCache", "ShardReadError", "cache_folder_problem", "check_range",
           "folder_overlap", "open_shard", "printable", "read_bytes", "redact", "settings_problem"]

_CHUNK = 1 << 20
_MAX_PAUSE_S = 30.0
_PROGRESS = 1 << 20  # bytes read after a failure that make the next one count from zero again


@dataclass(frozen=True)
class RemoteSettings:
    """How remote shards are read. The defaults suit a data centre link; tests shrink them."""

    retries: int = 5  # failures in a row before ShardReadError (1 MiB of progress starts a new count)
    timeout_s: float = 60.0  # longest a connect or a single read may block
    backoff_s: float = 1.0  # first pause before a retry; doubles each failure in a row
    cache_dir: str | None = None  # the cache keeps its copies in CACHE_SUBFOLDER of it (None: no cache)
    cache_limit_bytes: int | None = None  # required with cache_dir: the most the cache may hold

    def __post_init__(self):
        problem = settings_problem(self.retries, self.timeout_s, self.cache_dir, self.cache_limit_bytes,
                                   self.backoff_s)
        if problem:
            raise ValueError(problem)


_SETTING_NAMES = {"retries": "retries", "timeout_s": "timeout_s", "cache_dir": "cache_dir",
                  "cache_limit": "cache_limit_bytes", "backoff_s": "backoff_s"}


def settings_problem(retries: int, timeout_s: float, cache_dir: str | None, cache_limit: float | None,
                     backoff_s: float = 0.0, names: dict[str, str] = _SETTING_NAMES) -> str | None:
    """The rules every remote setting obeys, or None. `names` says what the caller calls each field (the
    run config's keys, e.g. {'retries': 'data.retries', ...}); the cache limit's unit is the caller's."""
    if retries < 0:
        return f"{names['retries']}={retries} must be >= 0 (0: a failed read skips the shard at once)"
    if not timeout_s > 0:
        return f"{names['timeout_s']}={timeout_s} must be a positive number of seconds"
    if backoff_s < 0:
        return f"{names['backoff_s']}={backoff_s} must be >= 0"
    if (cache_dir is None) != (cache_limit is None):
        return (f"{names['cache_dir']} and {names['cache_limit']} go together: give the cache folder (e.g. a node's "
                "local SSD) and the most disk it may use")
    if cache_limit is not None and not cache_limit > 0:
        return f"{names['cache_limit']}={cache_limit} must be positive"
    return None


def folder_overlap(cache_dir: str | Path, folder: str | Path) -> str | None:
    """How a cache folder overlaps `folder` (is it, lies inside it, or holds it), or None. The cache
    deletes what it evicts, so it must live apart from a run's files."""
    cache, other = Path(cache_dir).resolve(), Path(folder).resolve()
    if cache == other:
        return "is"
    if other in cache.parents:
        return "is inside"
    if cache in other.parents:
        return "holds"
    return None


def cache_folder_problem(cache_dir: str | Path) -> str | None:
    """Why cache_dir's CACHE_SUBFOLDER cannot be the cache's own folder, or None. Eviction deletes inside
    it, so it must be a real folder (the cache creates it), not a link to somewhere else."""
    folder = Path(cache_dir) / CACHE_SUBFOLDER
    if folder.is_symlink():
        return (f"{folder} is a symbolic link: the cache deletes the copies it evicts in that folder, so it keeps "
                "them only in a folder of its own; remove the link (the cache creates the folder)")
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a folder: the cache keeps its copies in a folder of that name; move the file away"
    return None


class ShardReadError(OSError):
    """A shard that could not be read; `url` is redacted, the message says why and what was tried."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = redact(url), redact(reason)
        super().__init__(f"shard {self.url}: {self.reason}")

    def __reduce__(self):  # crosses process boundaries (loader workers) intact
        return type(self), (self.url, self.reason)


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
    if _local_path(url) is None and settings.cache_dir is not None:
        return ShardCache(settings).open(url, offset, size=size, sha256=sha256)
    return open_uncached(url, offset, length=length, size=size, settings=settings)


def check_range(url: str, offset: int, length: int | None, size: int | None) -> None:
    """The bounds every read of a shard obeys, whether it opens the shard or reuses an open handle:
    bytes offset..offset + length inside the index's size."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"offset={offset} and length={length} must be >= 0")
    end = offset + length if length is not None else offset
    if size is not None and end > size:
        raise ShardReadError(url, f"bytes {offset}..{end} are past the end of the shard ({size} bytes)")


def open_uncached(url: str, offset: int = 0, *, length: int | None = None, size: int | None = None,
                  settings: RemoteSettings | None = None) -> BinaryIO:
    """open_shard without the cache: a local file, or a retrying remote stream."""
    settings = settings or RemoteSettings()
    path = _local_path(url)
    end = offset + length if length is not None else None
    if path is not None:
        return _open_local(url, path, offset, size, end)
    source = _remote_source(url, settings)
    return io.BufferedReader(_ResumingReader(url, source, offset, end, size, settings), buffer_size=_CHUNK)


def read_bytes(url: str, settings: RemoteSettings | None = None, most: int | None = None) -> bytes:
    """The whole object at `url` (e.g. an index.json), through the same sources and retries; at most
    `most` bytes of it when given (a caller bounding what it reads into memory)."""
    chunks, count = [], 0
    with open_uncached(url, settings=settings) as stream:
        while most is None or count < most:
            chunk = stream.read(_CHUNK if most is None else min(_CHUNK, most - count))
            if not chunk:
                break
            chunks.append(chunk)
            count += len(chunk)
    return b"".join(chunks)


# ------------------------------------------------------------------ redaction

_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?P<password>:[^/@\s]*)?@")
_QUERY_VALUE = re.compile(r"(?P<name>[?&][^=&#\s]+)=[^&#\s'\"]*")
_SECRET_ASSIGNMENT = re.compile(r"(?P<name>\b\w*(?:SECRET|TOKEN|PASSWORD|PASSWD|KEY)\w*=)[^\s&;'\"]+", re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<name>Authorization:\s*\w+\s+)[^\s'\"]+", re.IGNORECASE)
_USER_OPTION = re.compile(r"(?P<name>(?:^|\s)(?:-u|--user)\s+)[^\s'\"]+")  # curl/wget style user:password


def redact(text: str) -> str:
    """`text` with every credential-shaped part of the URLs (and pipe: commands) in it masked:
    passwords in user:password@, query values (tokens, presigned signatures), KEY=/TOKEN=/SECRET=
    assignments, Authorization headers and -u/--user options."""
    # A user name alone (https://TOKEN@host) is often the secret itself.
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@" if m["password"] else f"{m['scheme']}***@", text)
    text = _QUERY_VALUE.sub(lambda m: f"{m['name']}=***", text)
    text = _SECRET_ASSIGNMENT.sub(lambda m: f"{m['name']}***", text)
    text = _AUTH_HEADER.sub(lambda m: f"{m['name']}***", text)
    return _USER_OPTION.sub(lambda m: f"{m['name']}***", text)


def printable(text: str) -> str:
    """`text` with its control characters (newlines, terminal escapes) escaped, as Python writes them:
    untrusted text (a key from a shard, a name from a file) shown in one line that cannot restyle a terminal."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------------ local files


def _local_path(url: str) -> Path | None:
    if url.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path))
    if "://" in url or url.startswith("pipe:"):
        return None
    return Path(url)


def _open_local(url: str, path: Path, offset: int, size: int | None, end: int | None = None) -> BinaryIO:
    try:
        stream = open(path, "rb")  # noqa: SIM115 (the caller owns it)
    except OSError as err:
        raise ShardReadError(url, f"{type(err).__name__}: {err.strerror or err}") from None
    problem = _size_problem(os.fstat(stream.fileno()).st_size, offset, end, size)
    if problem:
        stream.close()
        raise ShardReadError(url, f"{problem}; copy it again or re-pack")
    return _positioned(url, stream, offset)


def _size_problem(actual: int, offset: int, end: int | None, size: int | None) -> str | None:
    """A range [offset, end) needs only its bytes; a read to the end needs the index's whole size."""
    if end is not None:
        if end > actual:
            return f"bytes {offset}..{end} are past the end of the shard ({actual} bytes; truncated?)"
        return None
    if size is not None and actual != size:
        return f"the shard has {actual} bytes but the index says {size}: truncated or replaced since it was packed"
    return None


def _positioned(url: str, stream: BinaryIO, offset: int) -> BinaryIO:
    actual = os.fstat(stream.fileno()).st_size
    if offset > actual:
        stream.close()
        raise ShardReadError(url, f"offset {offset} is past the end of the file ({actual} bytes)")
    stream.seek(offset)
    return stream


# ------------------------------------------------------------------ the retrying reader


class _Opened(Protocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


class _Source(Protocol):
    def open(self, position: int, end: int | None) -> tuple[_Opened, int | None]:
        """A stream at `position` (that may stop at `end`) and the object's total size when the source tells it."""

    def transient(self, error: BaseException) -> bool:
        """True when re-opening may succeed."""


class _ResumingReader(io.RawIOBase):
    def __init__(self, url: str, source: _Source, offset: int, end: int | None, size: int | None,
                 settings: RemoteSettings):
        super().__init__()
        self._url, self._source, self._settings = url, source, settings
        self._position, self._end, self._size = offset, end, size
        self._stream: _Opened | None = None
        self._failures = 0  # in a row: only _PROGRESS bytes read since the last failure start a new count
        self._since_failure = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while True:
            try:
                data = self._read(len(buffer))
            except ShardReadError:
                raise
            except Exception as err:  # noqa: BLE001 (each source says which of its errors pass)
                self._drop()
                if not self._source.transient(err):
                    raise ShardReadError(self._url, f"{_describe(err)} (at byte {self._position})") from None
                self._failures, self._since_failure = self._failures + 1, 0
                if self._failures > self._settings.retries:
                    raise ShardReadError(self._url, f"gave up at byte {self._position} after "
                                                    f"{self._settings.retries} retries: {_describe(err)}") from None
                pause = min(_MAX_PAUSE_S, self._settings.backoff_s * 2 ** (self._failures - 1))
                time.sleep(pause * random.uniform(0.5, 1.0))  # jitter: many workers do not retry in step
                continue
            buffer[:len(data)] = data
            self._position += len(data)
            self._since_failure += len(data)
            if self._since_failure >= _PROGRESS:
                self._failures = 0
            return len(data)

    def _stop(self) -> int | None:
        """Where this stream ends, when known: the end of the range asked for, else of the shard."""
        return self._end if self._end is not None else self._size

    def _read(self, n: int) -> bytes:
        if self._stream is None:
            if self._stop() is not None and self._position >= self._stop():
                return b""
            self._stream, total = self._source.open(self._position, self._end)
            problem = _size_problem(total, self._position, self._end, self._size) if total is not None else None
            if problem:
                raise ShardReadError(self._url, f"{problem}; re-pack or re-upload")
            self._size = total if self._size is None else self._size
        stop = self._stop()
        if stop is not None:
            if self._position >= stop:
                return b""
            n = min(n, stop - self._position)
        # read1 returns what has arrived instead of waiting for a full buffer: bytes received before a
        # stall or a drop count as progress and are not fetched again.
        data = getattr(self._stream, "read1", self._stream.read)(n)
        if not data and stop is not None:
            raise _ShortRead(f"the stream ended at byte {self._position}, before byte {stop}")
        return data

    def _drop(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            try:
                stream.close()
            except Exception:  # noqa: BLE001 (a broken connection may fail to close; it is dropped anyway)
                pass

    def close(self) -> None:
        self._drop()
        super().close()


class _ShortRead(ConnectionError):
    """The connection ended before the known size: retried like a dropped connection."""


def _describe(error: BaseException) -> str:
    if isinstance(error, (_ShortRead, _WrongRange, _CommandFailed)):  # ours: the message says it all
        return redact(str(error))
    return redact(f"{type(error).__name__}: {str(error) or repr(error)}")


# ------------------------------------------------------------------ http(s)


@dataclass(frozen=True)
class _HttpSource:
    url: str  # without user:password@
    authorization: str | None
    timeout_s: float

    @classmethod
    def parse(cls, url: str, settings: RemoteSettings) -> _HttpSource:
        parts = urllib.parse.urlsplit(url)
        authorization = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return cls(url, authorization, settings.timeout_s)

    def open(self, position: int, end: int | None) -> tuple[_Opened, int | None]:
        request = urllib.request.Request(self.url)
        if self.authorization:
            request.add_unredirected_header("Authorization", self.authorization)
        if position or end is not None:
            request.add_header("Range", _byte_range(position, end))
        response = urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 (http(s) only)
        try:
            length = response.headers.get("Content-Length")
            if response.status == 206:
                return response, _answered_range(response.headers.get("Content-Range"), length, position, end)
            if response.status != 200:
                raise _WrongRange(f"HTTP status {response.status} to a GET, expected 200 or 206")
            # The whole object, whatever Range said: its head is dropped here, never taken for the range.
            _discard(response, position)
        except BaseException:
            response.close()
            raise
        return response, int(length) if length and length.isdigit() else None

    def transient(self, error: BaseException) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            return error.code in (408, 429) or error.code >= 500
        return isinstance(error, (OSError, HTTPException))  # URLError, timeouts, resets, IncompleteRead


def _byte_range(position: int, end: int | None) -> str:
    """The HTTP/S3 Range header value for bytes [position, end)."""
    return f"bytes={position}-{end - 1 if end is not None else ''}"


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class _WrongRange(ConnectionError):
    """A server that answered a Range request with other bytes than asked for (a misconfigured proxy or
    CDN, a cache serving the object's head): an error for this read, retried like a dropped connection."""


def _answered_range(content_range: str | None, length, position: int, end: int | None) -> int | None:
    """The object's size from a ranged answer's Content-Range, once it is the range asked for:
    the same first byte, the same last byte (the object's last for an open range), and a length that
    agrees. A range past the object's end is left to the size check (a permanent error, not a retry)."""
    asked = _byte_range(position, end).removeprefix("bytes=")
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None:
        raise _WrongRange(f"asked for bytes {asked}, the answer has " +
                          (f"Content-Range {content_range!r}" if content_range else "no Content-Range"))
    first, last = int(match[1]), int(match[2])
    total = int(match[3]) if match[3] != "*" else None
    if total is not None and end is not None and end > total:
        return total
    wanted_last = end - 1 if end is not None else (total - 1 if total is not None else last)
    if (first, last) != (position, wanted_last) or (total is not None and last >= total):
        raise _WrongRange(f"asked for bytes {asked}, the server sent bytes {first}-{last}/{match[3]}")
    if length is not None and str(length) != str(last - first + 1):
        raise _WrongRange(f"asked for bytes {asked}, the answer is {length} bytes long for Content-Range {content_range}")
    return total


def _discard(stream: _Opened, count: int) -> None:
    while count:
        data = stream.read(min(count, _CHUNK))
        if not data:
            raise _ShortRead(f"the stream ended {count} bytes before the offset")
        count -= len(data)


# ------------------------------------------------------------------ s3

_S3_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException",
                       "InternalError", "ServiceUnavailable"}
_S3_CLIENTS: dict[tuple, object] = {}  # per process (a fork must not share a connection pool)
_S3_LOCK = threading.Lock()
_S3_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")


def _s3_client(timeout_s: float):
    import boto3
    from botocore.config import Config

    key = (os.getpid(), timeout_s, *(os.environ.get(name) for name in _S3_ENVIRONMENT))
    with _S3_LOCK:
        if key not in _S3_CLIENTS:
            # botocore's own retries are off: the reader's bound is the only one, and it resumes mid-shard.
            config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                            retries={"total_max_attempts": 1})
            _S3_CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _S3_CLIENTS[key]


@dataclass(frozen=True)
class _S3Source:
    bucket: str
    key: str
    timeout_s: float

    @classmethod
    def parse(cls, url: str, settings: RemoteSettings) -> _S3Source:
        parts = urllib.parse.urlsplit(url)
        if not parts.netloc or not parts.path.strip("/"):
            raise ShardReadError(url, "an S3 shard URL looks like s3://bucket/path/shard.tar")
        return cls(parts.netloc, parts.path.lstrip("/"), settings.timeout_s)

    def open(self, position: int, end: int | None) -> tuple[_Opened, int | None]:
        arguments = {"Bucket": self.bucket, "Key": self.key}
        if position or end is not None:
            arguments["Range"] = _byte_range(position, end)
        response = _s3_client(self.timeout_s).get_object(**arguments)
        if "Range" not in arguments:
            return response["Body"], response.get("ContentLength")
        try:
            return response["Body"], _answered_range(response.get("ContentRange"), response.get("ContentLength"),
                                                     position, end)
        except _WrongRange:
            response["Body"].close()
            raise

    def transient(self, error: BaseException) -> bool:
        from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, NoRegionError,
                                         ParamValidationError, PartialCredentialsError)

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code in _S3_TRANSIENT_CODES or status >= 500
        if isinstance(error, (NoCredentialsError, PartialCredentialsError, NoRegionError, ParamValidationError)):
            return False
        return isinstance(error, (BotoCoreError, OSError))  # connect/read timeouts, dropped streams


# ------------------------------------------------------------------ pipe:


class _PipeStream:
    """stdout of a shell command, each read bounded by the timeout."""

    def __init__(self, command: str, timeout_s: float):
        # Its own process group, so that closing a half-read shard also ends what the shell started.
        self._process = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE,  # noqa: S602 (the user's own)
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self._timeout_s = timeout_s

    def read(self, n: int) -> bytes:
        stdout = self._process.stdout
        ready, _, _ = select.select([stdout], [], [], self._timeout_s)
        if not ready:
            raise TimeoutError(f"no output from the command for {self._timeout_s} s")
        data = os.read(stdout.fileno(), n)
        if not data:
            status = self._process.wait(timeout=self._timeout_s)
            if status != 0:
                raise _CommandFailed(status)
        return data

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                os.killpg(self._process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended meanwhile
                pass
        self._process.stdout.close()
        self._process.wait()


class _CommandFailed(ChildProcessError):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"the command exited with status {status}")


@dataclass(frozen=True)
class _PipeSource:
    command: str
    timeout_s: float

    def open(self, position: int, end: int | None) -> tuple[_Opened, int | None]:  # the reader stops at end
        stream = _PipeStream(self.command, self.timeout_s)
        try:
            _discard(stream, position)
        except BaseException:
            stream.close()
            raise
        return stream, None

    def transient(self, error: BaseException) -> bool:
        if isinstance(error, _CommandFailed):
            return error.status not in (126, 127)  # not executable / not found: retrying cannot help
        return isinstance(error, OSError)


def _remote_source(url: str, settings: RemoteSettings) -> _Source:
    if url.startswith("pipe:"):
        return _PipeSource(url[len("pipe:"):], settings.timeout_s)
    scheme = url.partition("://")[0].lower()
    if scheme in ("http", "https"):
        return _HttpSource.parse(url, settings)
    if scheme == "s3":
        return _S3Source.parse(url, settings)
    raise ShardReadError(url, f"unsupported scheme '{scheme}://'; use a local path, file://, http(s)://, "
                              "s3:// or pipe:COMMAND")


# ------------------------------------------------------------------ cache


CACHE_SUBFOLDER = "restormer-shard-cache"


class ShardCache:
    """Whole-shard copies in settings.cache_dir/CACHE_SUBFOLDER, at most settings.cache_limit_bytes in all.

    - Ownership: the cache deletes only what it wrote. Its manifest file lists the copies it wrote;
      eviction and the removal of a bad copy touch only listed files, and a file at a copy's name
      that the manifest does not list is never deleted or overwritten (the shard is then streamed,
      not kept). Besides listed copies it deletes only its own temporary files (.tmp-PID-THREAD-NAME)
      left for an hour by a dead process. Other files in cache_dir or the subfolder are left alone.
      The manifest is not trusted either: a name in it that is not one path_for gives (an absolute
      path, `../`, any separator) is ignored with a warning, and so is a manifest that is a symbolic
      link or not a regular file; a subfolder that is a symbolic link is refused (cache_folder_problem).
    - A miss downloads the whole shard (through the retrying reader) to a temporary file in the
      subfolder, checks its size and sha256 against the index's when given, and renames it into
      place: readers only ever see complete files. One process per host downloads a given shard
      while the others that miss it wait on a lock file (flock: released by the kernel if that
      process dies) and then read its copy; without working flock (some network file systems) they
      download it too, and the atomic rename still keeps every copy whole.
    - A hit checks the size every time, and the sha256 once per process and copy (a copy left by an
      earlier run or another process is hashed before its first use here; hashing on every open
      would cost a shard's read per sample for a reader that seeks). A copy that fails is deleted,
      named in a warning and fetched again. Bytes changed in place after a process checked them
      (the same file, the same size) go unseen by that process; the stream's per-sample digests
      still refuse the samples they change.
    - After each download the least recently used listed copies (hits touch the file's mtime) are
      deleted until they are within the limit; an open copy stays readable after its deletion
      (POSIX). Concurrent downloads can overshoot the limit by the shards in flight. A shard larger
      than the whole limit is streamed from its download and not kept.
    - Copies are named by a hash of the URL without credentials or query, so a re-signed presigned
      URL still hits, and no secret reaches a file name.
    """

    _STALE_TMP_S = 3600  # a temporary file untouched this long belongs to a dead process
    _HASH_CHARS, _TAIL_CHARS = 24, 80  # a copy's name: this much of the URL's sha256, a dash, the URL's tail
    _COPY = re.compile(rf"[0-9a-f]{{{_HASH_CHARS}}}-[A-Za-z0-9._-]{{0,{_TAIL_CHARS}}}")  # every name path_for gives
    _TMP = re.compile(rf"\.tmp-(\d+-\d+-{_COPY.pattern}|manifest-\d+-\d+)")
    MANIFEST = "manifest.txt"

    def __init__(self, settings: RemoteSettings):
        if settings.cache_dir is None or settings.cache_limit_bytes is None:
            raise ValueError("ShardCache needs settings.cache_dir and settings.cache_limit_bytes")
        self.settings = settings
        self.folder = Path(settings.cache_dir) / CACHE_SUBFOLDER
        self.limit = settings.cache_limit_bytes

    def path_for(self, url: str) -> Path:
        stable = _USERINFO.sub(lambda m: m["scheme"], url).split("?", 1)[0]
        tail = re.sub(r"[^A-Za-z0-9._-]", "_", stable.rstrip("/").rsplit("/", 1)[-1])[-self._TAIL_CHARS:]
        return self.folder / f"{hashlib.sha256(stable.encode()).hexdigest()[:self._HASH_CHARS]}-{tail}"

    def open(self, url: str, offset: int = 0, *, size: int | None = None, sha256: str | None = None) -> BinaryIO:
        problem = cache_folder_problem(self.settings.cache_dir)
        if problem:
            raise ShardReadError(url, problem)
        path = self.path_for(url)
        stream = self._hit(url, path, offset, size, sha256)
        if stream is not None:
            return stream
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(f".lock-{path.name}"), "ab") as lock:
            _flock(lock)
            stream = self._hit(url, path, offset, size, sha256)  # fetched by another process while we waited?
            return stream if stream is not None else self._fetch(url, path, offset, size, sha256)

    def _hit(self, url: str, path: Path, offset: int, size: int | None, sha256: str | None) -> BinaryIO | None:
        try:
            stream = open(path, "rb")  # noqa: SIM115 (opened first: an eviction from now on cannot hurt)
        except FileNotFoundError:
            return None
        problem = _check_copy(stream, size, sha256)
        if problem is None:
            try:
                os.utime(path)
            except FileNotFoundError:  # evicted by another process since we opened it: still readable
                pass
            return _positioned(url, stream, offset)
        stream.close()
        with self._manifest() as owned:
            if path.name in owned:
                owned.remove(path.name)
                path.unlink(missing_ok=True)
                warnings.warn(f"cached copy of shard {redact(url)} ({path}) {problem}: fetching it again", stacklevel=3)
            else:
                warnings.warn(f"{path} {problem}, and the cache did not write it (not in its {self.MANIFEST}): left "
                              f"alone; shard {redact(url)} is read without the cache", stacklevel=3)
        return None

    def _fetch(self, url: str, path: Path, offset: int, size: int | None, sha256: str | None) -> BinaryIO:
        tmp = path.with_name(f".tmp-{os.getpid()}-{threading.get_ident()}-{path.name}")
        try:
            digest = hashlib.sha256()
            with open_uncached(url, size=size, settings=self.settings) as source, open(tmp, "wb") as copy:
                while chunk := source.read(_CHUNK):
                    digest.update(chunk)
                    copy.write(chunk)
            if sha256 is not None and digest.hexdigest() != sha256:
                raise ShardReadError(url, f"downloaded sha256 {digest.hexdigest()[:16]}... differs from the index's "
                                          f"{sha256[:16]}...: changed since it was packed; re-pack or re-upload")
            stream = _open_local(url, tmp, offset, size)  # before the rename: no eviction can take it now
            _mark_verified(stream, sha256)
            fetched = os.fstat(stream.fileno()).st_size
            if fetched > self.limit:
                warnings.warn(f"shard {redact(url)} ({fetched} bytes) is larger than the whole cache limit "
                              f"({self.limit} bytes): streamed, not kept", stacklevel=3)
                return stream
            self._admit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return stream

    def _admit(self, tmp: Path, path: Path) -> None:
        """Lists the copy, renames it into place and evicts, in one turn of the manifest's lock: a listed
        name's file is always one the cache wrote (or gone)."""
        with self._manifest() as owned:
            if path.exists() and path.name not in owned:
                return  # someone else's file at this name: not overwritten, the download is streamed
            owned.add(path.name)
            os.replace(tmp, path)
            self._evict(owned, keep=path)

    def _evict(self, owned: set[str], keep: Path) -> None:
        copies, now = [], time.time()
        for name in sorted(owned):
            try:
                stat = (self.folder / name).stat()
            except FileNotFoundError:  # removed by hand, or a process died between listing and renaming
                owned.discard(name)
                continue
            copies.append((stat.st_mtime, stat.st_size, name))
        total = sum(size for _, size, _ in copies)
        for _, size, name in sorted(copies):
            if total <= self.limit:
                break
            if name != keep.name:
                (self.folder / name).unlink(missing_ok=True)
                owned.discard(name)
                total -= size
        for entry in os.scandir(self.folder):  # this cache's own temporary files, left by dead processes
            if self._TMP.fullmatch(entry.name):
                try:
                    if now - entry.stat().st_mtime > self._STALE_TMP_S:
                        Path(entry.path).unlink(missing_ok=True)
                except FileNotFoundError:
                    pass

    @contextlib.contextmanager
    def _manifest(self) -> Iterator[set[str]]:
        """The names of the copies the cache wrote, held under an exclusive lock; changes to the set are
        written back (atomically) when the block ends."""
        self.folder.mkdir(parents=True, exist_ok=True)
        manifest = self.folder / self.MANIFEST
        with open(self.folder / f".lock-{self.MANIFEST}", "ab") as lock:
            _flock(lock)
            owned = self._read_manifest(manifest)
            before = set(owned)
            yield owned
            if owned != before:
                tmp = manifest.with_name(f".tmp-manifest-{os.getpid()}-{threading.get_ident()}")
                tmp.write_text("".join(f"{name}\n" for name in sorted(owned)), encoding="utf-8")
                os.replace(tmp, manifest)

    def _read_manifest(self, manifest: Path) -> set[str]:
        """The copy names listed in `manifest`: only names path_for gives, so that no damaged or hostile
        line (`../../run/config.yaml`, an absolute path) can make eviction delete outside the folder."""
        def ignored(what: str) -> set[str]:
            warnings.warn(f"{manifest} is {what}, not the file the cache writes: ignored (the copies it lists are "
                          "left alone; a regular file replaces it at the next change)", stacklevel=4)
            return set()

        try:  # not followed: a link's target is not the cache's; non-blocking: a FIFO must not hang the reader
            fd = os.open(manifest, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except FileNotFoundError:
            return set()
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
            return ignored("a symbolic link")
        with open(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return ignored("not a regular file")
            names = handle.read().decode("utf-8", errors="replace").split()
        owned = {name for name in names if self._COPY.fullmatch(name)}
        foreign = [name for name in names if name not in owned]
        if foreign:
            warnings.warn(f"{manifest}: ignored {len(foreign)} name(s) that the cache never gives a copy, e.g. "
                          f"'{printable(foreign[0][:100])}' (damaged or edited): the files they name are left alone",
                          stacklevel=4)
        return owned


_VERIFIED: set[tuple[int, int, int, str]] = set()  # (device, inode, size, sha256) this process has hashed


def _flock(handle: BinaryIO) -> None:
    """An exclusive lock on the open file, held until it is closed; a no-op where flock is unsupported."""
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
    except OSError as err:
        if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise


def _check_copy(stream: BinaryIO, size: int | None, sha256: str | None) -> str | None:
    """None when the open cached file matches what the index says, else what is wrong."""
    stat = os.fstat(stream.fileno())
    if size is not None and stat.st_size != size:
        return f"has {stat.st_size} bytes, the index says {size}"
    if sha256 is None or (stat.st_dev, stat.st_ino, stat.st_size, sha256) in _VERIFIED:
        return None
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    if digest.hexdigest() != sha256:
        return "does not match the index's sha256"
    _mark_verified(stream, sha256)
    return None


def _mark_verified(stream: BinaryIO, sha256: str | None) -> None:
    if sha256 is not None:
        stat = os.fstat(stream.fileno())
        _VERIFIED.add((stat.st_dev, stat.st_ino, stat.st_size, sha256))
