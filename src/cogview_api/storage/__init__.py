"""Where image bytes live. `ImageStorage` is the seam; `open_storage` picks a backend by URL:
`local` (a folder, the embedded default) or `s3` (a bucket, for many workers and API processes).
An S3 backend can also hand out presigned GET URLs (`PresignedUrls`), so clients download
images from the bucket instead of through the API.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cogview_api.storage.local import LocalStorage


class ImageStorage(Protocol):
    """Stores image bytes under a key. Keys are opaque, slash-separated, made by the worker.

    `put` is atomic: a reader sees the whole object or nothing. `get` returns None for a key
    that does not exist (never written, or deleted). `delete` of a missing key is not an error.
    """

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...


# SigV4's ceiling on a presigned URL's life (7 days): AWS and MinIO refuse longer ones.
PRESIGN_MAX_SECONDS = 7 * 24 * 3600


@runtime_checkable
class PresignedUrls(Protocol):
    """A store whose objects can be fetched by anyone holding a signed URL, until it expires."""

    def presigned_url(self, key: str, expires_in: int) -> str:
        """A GET URL for `key` valid `expires_in` seconds (1 to `PRESIGN_MAX_SECONDS`).
        Signing is local: it neither checks that the object exists nor reaches the store."""
        ...


def open_storage(
    url: str, *, s3_endpoint_url: str | None = None, s3_public_endpoint_url: str | None = None
) -> ImageStorage:
    """`file://PATH` (a local folder) or `s3://BUCKET[/PREFIX]` (at `s3_endpoint_url` for an
    S3-compatible service, else AWS; presigned URLs name `s3_public_endpoint_url` if given)."""
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"))
    if url.startswith("s3://"):
        from cogview_api.storage.s3 import S3Storage  # boto3 loads only when S3 is used

        return S3Storage.from_url(
            url, endpoint_url=s3_endpoint_url, public_endpoint_url=s3_public_endpoint_url
        )
    raise ValueError(
        f"COGVIEW_STORAGE_URL {url!r} is not supported; use file://PATH or s3://BUCKET/PREFIX"
    )


__all__ = [
    "PRESIGN_MAX_SECONDS",
    "ImageStorage",
    "LocalStorage",
    "PresignedUrls",
    "open_storage",
]
