"""Images in an S3 bucket: AWS, or any S3-compatible service (MinIO, Ceph, R2) by endpoint URL.

Credentials come from boto3's usual chain (`AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`, a
profile, an instance role). boto and botocore errors are translated here into `StorageError`;
timeouts and retries are short so that a store that is down fails a task in seconds.

Presigned GET URLs are signed (SigV4, locally, no request) for the endpoint that clients reach:
`public_endpoint_url` when the service's address inside the deployment (`http://minio:9000`)
is not the one outside it, since the signature covers the Host header and cannot be moved to
another host afterwards. A URL signed with temporary credentials (an instance role, STS) stops
working when those credentials expire, whatever its own expiry says.
"""

from __future__ import annotations

from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cogview_api.errors import StorageError
from cogview_api.storage import PRESIGN_MAX_SECONDS

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

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
    ) -> None:
        if not bucket:
            raise ValueError("an S3 storage URL needs a bucket: s3://BUCKET[/PREFIX]")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url or None, config=_config(endpoint_url)
        )
        # Signs presigned URLs only (no request is ever sent through it), for the address
        # clients use. "s3v4": SigV4, whose URLs live up to 7 days; SigV2 is deprecated.
        signing_endpoint = public_endpoint_url or endpoint_url
        self._signer: Any = session.client(
            "s3",
            endpoint_url=signing_endpoint or None,
            config=_config(signing_endpoint).merge(Config(signature_version="s3v4")),
        )

    @classmethod
    def from_url(
        cls, url: str, *, endpoint_url: str | None = None, public_endpoint_url: str | None = None
    ) -> S3Storage:
        """`s3://bucket` or `s3://bucket/prefix/...`."""
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        return cls(
            bucket, prefix, endpoint_url=endpoint_url, public_endpoint_url=public_endpoint_url
        )

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

    def presigned_url(self, key: str, expires_in: int) -> str:
        """A GET URL for the object, valid `expires_in` seconds without credentials."""
        if not 1 <= expires_in <= PRESIGN_MAX_SECONDS:
            raise ValueError(f"presigned URLs live 1 to {PRESIGN_MAX_SECONDS} s, not {expires_in}")
        try:
            url: str = self._signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._key(key)},
                ExpiresIn=expires_in,
            )
        except (BotoCoreError, ClientError) as exc:  # no credentials to sign with, and the like
            raise _storage_error("link to") from exc
        return url


def _config(endpoint_url: str | None) -> Config:
    if not endpoint_url:
        return CLIENT_CONFIG
    # S3-compatible services are reached by path (`http://host/bucket/key`): no per-bucket DNS
    # names to set up.
    return CLIENT_CONFIG.merge(Config(s3={"addressing_style": "path"}))


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _storage_error(action: str) -> StorageError:
    # The driver's words reach the log through the chained cause (`from exc`), not clients.
    return StorageError(f"The image store could not {action} an image; try again shortly.")
