"""The resuming reader: one remote read that re-opens its source at the byte reached after a failure
that may pass, within the retry bound (the contract in data_shards/remote/__init__.py)."""

from __future__ import annotations

import io
import random
import time
from typing import Protocol

from data_shards.remote.errors import ShardReadError, SourceFault, size_problem
from data_shards.remote.settings import RemoteSettings
from data_shards.remote.text import redact

CHUNK = 1 << 20
_MAX_PAUSE_S = 30.0
_PROGRESS = 1 << 20  # bytes read after a failure that make the next one count from zero again


class Opened(Protocol):
    def read(self, n: int) -> bytes: ...
    def close(self) -> None: ...


class Source(Protocol):
    def open(self, position: int, end: int | None) -> tuple[Opened, int | None]:
        """A stream at `position` (that may stop at `end`) and the object's total size when the source tells it."""

    def transient(self, error: BaseException) -> bool:
        """True when re-opening may succeed."""


class ResumingReader(io.RawIOBase):
    def __init__(self, url: str, source: Source, offset: int, end: int | None, size: int | None,
                 settings: RemoteSettings):
        super().__init__()
        self._url, self._source, self._settings = url, source, settings
        self._position, self._end, self._size = offset, end, size
        self._stream: Opened | None = None
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
            problem = size_problem(total, self._position, self._end, self._size) if total is not None else None
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
            raise ShortRead(f"the stream ended at byte {self._position}, before byte {stop}")
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


class ShortRead(SourceFault, ConnectionError):
    """The connection ended before the known size: retried like a dropped connection."""


def _describe(error: BaseException) -> str:
    if isinstance(error, SourceFault):  # ours: the message says it all
        return redact(str(error))
    return redact(f"{type(error).__name__}: {str(error) or repr(error)}")


def discard(stream: Opened, count: int) -> None:
    """Reads and drops `count` bytes: a source that cannot start at an offset is read up to it."""
    while count:
        data = stream.read(min(count, CHUNK))
        if not data:
            raise ShortRead(f"the stream ended {count} bytes before the offset")
        count -= len(data)
