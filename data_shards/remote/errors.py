"""The error every failed read raises, and the bounds every read obeys."""

from __future__ import annotations

from data_shards.remote.text import redact


class ShardReadError(OSError):
    """A shard that could not be read; `url` is redacted, the message says why and what was tried."""

    def __init__(self, url: str, reason: str):
        self.url, self.reason = redact(url), redact(reason)
        super().__init__(f"shard {self.url}: {self.reason}")

    def __reduce__(self):  # crosses process boundaries (loader workers) intact
        return type(self), (self.url, self.reason)


class SourceFault(Exception):
    """A failure a source raises with a message of its own that says it all (not a library's exception,
    which is shown with its type)."""


def check_range(url: str, offset: int, length: int | None, size: int | None) -> None:
    """The bounds every read of a shard obeys, whether it opens the shard or reuses an open handle:
    bytes offset..offset + length inside the index's size."""
    if offset < 0 or (length is not None and length < 0):
        raise ValueError(f"offset={offset} and length={length} must be >= 0")
    end = offset + length if length is not None else offset
    if size is not None and end > size:
        raise ShardReadError(url, f"bytes {offset}..{end} are past the end of the shard ({size} bytes)")


def size_problem(actual: int, offset: int, end: int | None, size: int | None) -> str | None:
    """A range [offset, end) needs only its bytes; a read to the end needs the index's whole size."""
    if end is not None:
        if end > actual:
            return f"bytes {offset}..{end} are past the end of the shard ({actual} bytes; truncated?)"
        return None
    if size is not None and actual != size:
        return f"the shard has {actual} bytes but the index says {size}: truncated or replaced since it was packed"
    return None
