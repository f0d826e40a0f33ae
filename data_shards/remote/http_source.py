"""http(s):// shards: a GET with a Range header, user:password@ sent as Basic authentication; and the
check that a ranged answer (http's or S3's) is the range asked for."""

from __future__ import annotations

import base64
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException

from data_shards.remote.errors import SourceFault
from data_shards.remote.reader import Opened, discard
from data_shards.remote.settings import RemoteSettings


@dataclass(frozen=True)
class HttpSource:
    url: str  # without user:password@
    authorization: str | None
    timeout_s: float

    @classmethod
    def parse(cls, url: str, settings: RemoteSettings) -> HttpSource:
        parts = urllib.parse.urlsplit(url)
        authorization = None
        if parts.username is not None:
            pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            authorization = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
            url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        return cls(url, authorization, settings.timeout_s)

    def open(self, position: int, end: int | None) -> tuple[Opened, int | None]:
        request = urllib.request.Request(self.url)
        if self.authorization:
            request.add_unredirected_header("Authorization", self.authorization)
        if position or end is not None:
            request.add_header("Range", byte_range(position, end))
        response = urllib.request.urlopen(request, timeout=self.timeout_s)  # noqa: S310 (http(s) only)
        try:
            length = response.headers.get("Content-Length")
            if response.status == 206:
                return response, answered_range(response.headers.get("Content-Range"), length, position, end)
            if response.status != 200:
                raise WrongRange(f"HTTP status {response.status} to a GET, expected 200 or 206")
            # The whole object, whatever Range said: its head is dropped here, never taken for the range.
            discard(response, position)
        except BaseException:
            response.close()
            raise
        return response, int(length) if length and length.isdigit() else None

    def transient(self, error: BaseException) -> bool:
        if isinstance(error, urllib.error.HTTPError):
            return error.code in (408, 429) or error.code >= 500
        return isinstance(error, (OSError, HTTPException))  # URLError, timeouts, resets, IncompleteRead


def byte_range(position: int, end: int | None) -> str:
    """The HTTP/S3 Range header value for bytes [position, end)."""
    return f"bytes={position}-{end - 1 if end is not None else ''}"


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class WrongRange(SourceFault, ConnectionError):
    """A server that answered a Range request with other bytes than asked for (a misconfigured proxy or
    CDN, a cache serving the object's head): an error for this read, retried like a dropped connection."""


def answered_range(content_range: str | None, length, position: int, end: int | None) -> int | None:
    """The object's size from a ranged answer's Content-Range, once it is the range asked for:
    the same first byte, the same last byte (the object's last for an open range), and a length that
    agrees. A range past the object's end is left to the size check (a permanent error, not a retry)."""
    asked = byte_range(position, end).removeprefix("bytes=")
    match = _CONTENT_RANGE.fullmatch((content_range or "").strip())
    if match is None:
        raise WrongRange(f"asked for bytes {asked}, the answer has " +
                         (f"Content-Range {content_range!r}" if content_range else "no Content-Range"))
    first, last = int(match[1]), int(match[2])
    total = int(match[3]) if match[3] != "*" else None
    if total is not None and end is not None and end > total:
        return total
    wanted_last = end - 1 if end is not None else (total - 1 if total is not None else last)
    if (first, last) != (position, wanted_last) or (total is not None and last >= total):
        raise WrongRange(f"asked for bytes {asked}, the server sent bytes {first}-{last}/{match[3]}")
    if length is not None and str(length) != str(last - first + 1):
        raise WrongRange(f"asked for bytes {asked}, the answer is {length} bytes long for Content-Range {content_range}")
    return total
