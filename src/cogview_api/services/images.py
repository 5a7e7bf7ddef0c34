"""Images after their task: the bytes behind `/images/{token}.{fmt}`, a task's images as
base64 (OpenAI's `b64_json`), and the signer of presigned image URLs
(COGVIEW_IMAGE_URLS=presigned)."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

from cogview_api.clock import utcnow
from cogview_api.domain import OutputFormat, PreviewRecord, Task
from cogview_api.errors import CogviewError, NotFound
from cogview_api.media import CONTENT_TYPES
from cogview_api.storage import PRESIGN_MAX_SECONDS, ImageStorage, PresignedUrls
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database

GONE = "No such image (it may have expired)."
DAMAGED = "This image's stored file is damaged; it is not served."

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageBytes:
    data: bytes
    content_type: str
    max_age: int  # seconds left of its retention
    etag: str | None  # the file's SHA-256, when recorded


def image_bytes(db: Database, storage: ImageStorage, name: str) -> ImageBytes:
    """The image named `{token}.{format}` while it is retained; NotFound otherwise (an unknown
    token, another format's extension, expired, or its object gone from storage)."""
    token, _, ext = name.rpartition(".")
    with db.read() as conn:
        found = task_store.find_image(conn, token)
    if found is None or found.format != ext or found.expires_at <= utcnow():
        raise NotFound(GONE)
    data = storage.get(found.storage_key)
    if data is None:
        raise NotFound(GONE)
    damaged = (found.size_bytes is not None and len(data) != found.size_bytes) or (
        found.sha256 is not None and hashlib.sha256(data).hexdigest() != found.sha256
    )
    if damaged:
        log.error("image %s: its stored file does not match its size and SHA-256", name)
        raise NotFound(DAMAGED)
    max_age = max(0, int((found.expires_at - utcnow()).total_seconds()))
    return ImageBytes(
        data=data,
        content_type=CONTENT_TYPES[OutputFormat(found.format)],
        max_age=max_age,
        etag=found.sha256,
    )


def images_base64(storage: ImageStorage, task: Task) -> list[str]:
    """A completed task's image files, base64-encoded, in order."""
    encoded = []
    for image in task.images:
        data = storage.get(image.storage_key)
        if data is None:
            raise CogviewError(f"The images of task {task.id} are no longer stored.")
        encoded.append(base64.b64encode(data).decode("ascii"))
    return encoded


def preview_base64(storage: ImageStorage, preview: PreviewRecord) -> str | None:
    """A stored preview's file, base64-encoded; None once it is gone."""
    data = storage.get(preview.storage_key)
    return None if data is None else base64.b64encode(data).decode("ascii")


def presigner(mode: str, storage: ImageStorage) -> Callable[[str, int], str] | None:
    """The signer of image URLs for COGVIEW_IMAGE_URLS=`mode` (None for "proxy"): a GET URL of
    a storage key, valid the given seconds but at most SigV4's 7 days. Checked once, when the
    app is built: "presigned" needs a storage that can presign (S3)."""
    if mode == "proxy":
        return None
    if not isinstance(storage, PresignedUrls):
        raise ValueError(f"COGVIEW_IMAGE_URLS={mode} needs S3 storage, not {type(storage)}")
    signer: PresignedUrls = storage

    def presign(key: str, seconds: int) -> str:
        return signer.presigned_url(key, min(seconds, PRESIGN_MAX_SECONDS))

    return presign
