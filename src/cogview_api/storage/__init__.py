"""Where image bytes live. `ImageStorage` is the seam; `open_storage` picks a backend by URL:
`local` (a folder, the embedded default) or `s3` (a bucket, for many workers and API processes).
"""

from __future__ import annotations

from typing import Protocol

from cogview_api.storage.local import LocalStorage


class ImageStorage(Protocol):
    """Stores image bytes under a key. Keys are opaque, slash-separated, made by the worker.

    `put` is atomic: a reader sees the whole object or nothing. `get` returns None for a key
    that does not exist (never written, or deleted). `delete` of a missing key is not an error.
    """

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def delete(self, key: str) -> None: ...


def open_storage(url: str, *, s3_endpoint_url: str | None = None) -> ImageStorage:
    """`file://PATH` (a local folder) or `s3://BUCKET[/PREFIX]` (at `s3_endpoint_url` for an
    S3-compatible service, else AWS)."""
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"))
    if url.startswith("s3://"):
        from cogview_api.storage.s3 import S3Storage  # boto3 loads only when S3 is used

        return S3Storage.from_url(url, endpoint_url=s3_endpoint_url)
    raise ValueError(
        f"COGVIEW_STORAGE_URL {url!r} is not supported; use file://PATH or s3://BUCKET/PREFIX"
    )


__all__ = ["ImageStorage", "LocalStorage", "open_storage"]
