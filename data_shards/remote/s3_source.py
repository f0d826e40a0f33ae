"""s3://bucket/key shards: boto3 GetObject with a Range. Credentials, region, profile and endpoint come
from the usual AWS environment and config."""

from __future__ import annotations

import os
import threading
import urllib.parse
from dataclasses import dataclass

from data_shards.remote.errors import ShardReadError
from data_shards.remote.http_source import WrongRange, answered_range, byte_range
from data_shards.remote.reader import Opened
from data_shards.remote.settings import RemoteSettings

_TRANSIENT_CODES = {"RequestTimeout", "RequestTimeTooSkewed", "SlowDown", "Throttling", "ThrottlingException",
                    "InternalError", "ServiceUnavailable"}
_CLIENTS: dict[tuple, object] = {}  # per process (a fork must not share a connection pool)
_LOCK = threading.Lock()
_ENVIRONMENT = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_ACCESS_KEY_ID")


def s3_client(timeout_s: float):
    import boto3
    from botocore.config import Config

    key = (os.getpid(), timeout_s, *(os.environ.get(name) for name in _ENVIRONMENT))
    with _LOCK:
        if key not in _CLIENTS:
            # botocore's own retries are off: the reader's bound is the only one, and it resumes mid-shard.
            config = Config(connect_timeout=timeout_s, read_timeout=timeout_s,
                            retries={"total_max_attempts": 1})
            _CLIENTS[key] = boto3.session.Session().client("s3", config=config)
        return _CLIENTS[key]


@dataclass(frozen=True)
class S3Source:
    bucket: str
    key: str
    timeout_s: float

    @classmethod
    def parse(cls, url: str, settings: RemoteSettings) -> S3Source:
        parts = urllib.parse.urlsplit(url)
        if not parts.netloc or not parts.path.strip("/"):
            raise ShardReadError(url, "an S3 shard URL looks like s3://bucket/path/shard.tar")
        return cls(parts.netloc, parts.path.lstrip("/"), settings.timeout_s)

    def open(self, position: int, end: int | None) -> tuple[Opened, int | None]:
        arguments = {"Bucket": self.bucket, "Key": self.key}
        if position or end is not None:
            arguments["Range"] = byte_range(position, end)
        response = s3_client(self.timeout_s).get_object(**arguments)
        if "Range" not in arguments:
            return response["Body"], response.get("ContentLength")
        try:
            return response["Body"], answered_range(response.get("ContentRange"), response.get("ContentLength"),
                                                    position, end)
        except WrongRange:
            response["Body"].close()
            raise

    def transient(self, error: BaseException) -> bool:
        from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, NoRegionError,
                                         ParamValidationError, PartialCredentialsError)

        if isinstance(error, ClientError):
            code = error.response.get("Error", {}).get("Code", "")
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            return code in _TRANSIENT_CODES or status >= 500
        if isinstance(error, (NoCredentialsError, PartialCredentialsError, NoRegionError, ParamValidationError)):
            return False
        return isinstance(error, (BotoCoreError, OSError))  # connect/read timeouts, dropped streams
