"""Images in an S3 bucket: AWS, or any S3-compatible service (MinIO, Ceph, R2) by endpoint URL.

Credentials come from boto3's usual chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a
profile, an instance role). boto and botocore errors are translated here into `StorageError`;
timeouts and retries are short so that a store that is down fails a task in seconds.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cogview_api.errors import StorageError

# Connect fast or give up; a read timeout is a silence between bytes, not a whole transfer.
# "standard" retries: 3 attempts in all, with jittered backoff of at most a few seconds.
CLIENT_CONFIG = Config(
    connect_timeout=3,
    read_timeout=10,
    retries={"mode": "standard", "total_max_attempts": 3},
)

_MISSING_CODES = {"NoSuchKey", "404", "NotFound"}


class S3Storage:
    """`ImageStorage` on one bucket, every key under `prefix`. PutObject is atomic: a reader
    sees the whole object or nothing."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None) -> None:
        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        config = CLIENT_CONFIG
        if endpoint_url:
            # S3-compatible services are reached by path (`http://host/bucket/key`): no
            # per-bucket DNS names to set up.
            config = config.merge(Config(s3={"addressing_style": "path"}))
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url or None, config=config
        )

    @classmethod
    def from_url(cls, url: str, *, endpoint_url: str | None = None) -> S3Storage:
        """`s3://bucket` or `s3://bucket/prefix/...`."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(bucket, prefix, endpoint_url=endpoint_url)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (BotoCoreError, ClientError) as exc:
            raise _storage_error("store") from exc

    def get(self, key: str) -> bytes | None:
        try:
            response = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            data: bytes = response["Body"].read()
        except ClientError as exc:
            if _error_code(exc) in _MISSING_CODES:
                return None
            raise _storage_error("read") from exc
        except BotoCoreError as exc:
            raise _storage_error("read") from exc
        return data

    def delete(self, key: str) -> None:
        # DeleteObject of a missing key succeeds on S3; some compatible services say NoSuchKey.
        try:
            self._client.delete_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) not in _MISSING_CODES:
                raise _storage_error("delete") from exc
        except BotoCoreError as exc:
            raise _storage_error("delete") from exc


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _storage_error(action: str) -> StorageError:
    # The driver's words reach the log through the chained cause (`from exc`), not clients.
    return StorageError(f"The image store could not {action} an image; try again shortly.")
