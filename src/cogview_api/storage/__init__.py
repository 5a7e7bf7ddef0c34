"""Where image bytes live. `ImageStorage` is the seam; `open_storage` picks a backend by URL."""

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


def open_storage(url: str) -> ImageStorage:
    if url.startswith("file://"):
        return LocalStorage(url.removeprefix("file://"))
    raise ValueError(f"COGVIEW_STORAGE_URL {url!r} is not supported; use file://PATH")


__all__ = ["ImageStorage", "LocalStorage", "open_storage"]
