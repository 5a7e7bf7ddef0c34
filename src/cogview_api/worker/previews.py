"""Partial previews: the engine decodes them (engine/cogview4.py), the worker stores them.

A preview is the first image's current prediction, decoded after evenly spaced denoising steps
(`domain.preview_steps`) of a task that asked for them. It is stored as WebP (quality
`PREVIEW_QUALITY`) at the task's size, whatever the task's own format: small and quick to
encode, and shown by every browser. Its row (store/previews.py) gives it a random token, so
`/images/{token}.webp` serves it without a key until the retention passes, like an image.

A preview that cannot be stored is logged and skipped: it never fails its task. A task that
goes back to the queue and runs again keeps the previews of its first run (the same seed gives
the same preview) and stores only the ones it lacks.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from cogview_api.clock import utcnow
from cogview_api.domain import OutputFormat, PreviewRecord, Task, new_image_token
from cogview_api.errors import CogviewError
from cogview_api.media import CONTENT_TYPES
from cogview_api.storage import ImageStorage
from cogview_api.store import previews as preview_store
from cogview_api.store.db import Database
from cogview_api.worker.encode import encode_image

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

PREVIEW_FORMAT = OutputFormat.WEBP
PREVIEW_QUALITY = 75


class PreviewWriter:
    """The engine's `preview` callback for one batch: stores each preview and records it for
    the task, if this worker still holds the task."""

    def __init__(
        self,
        *,
        db: Database,
        storage: ImageStorage,
        worker_id: str,
        batch: Sequence[Task],
        retention: timedelta,
        on_changed: Callable[[str], None],
    ) -> None:
        self.db = db
        self.storage = storage
        self.worker_id = worker_id
        self.tasks = {t.id: t for t in batch}
        self.retention = retention
        self.on_changed = on_changed

    def __call__(self, task_id: str, index: int, step: int, image: Image) -> None:
        task = self.tasks.get(task_id)
        if task is None:
            return
        try:
            if self._store(task, index, step, image):
                self.on_changed(task_id)
        except Exception:  # noqa: BLE001 - a preview is a nicety: never a reason to fail a task
            log.warning("preview %d of task %s not stored", index, task_id, exc_info=True)

    def _store(self, task: Task, index: int, step: int, image: Image) -> bool:
        with self.db.read() as conn:
            if preview_store.has_preview(conn, task_id=task.id, index=index):
                return False
        token = new_image_token()
        key = f"{task.created_at:%Y/%m/%d}/{task.id}/preview-{index}-{token}.{PREVIEW_FORMAT}"
        data = encode_image(image, PREVIEW_FORMAT, PREVIEW_QUALITY)
        self.storage.put(key, data, CONTENT_TYPES[PREVIEW_FORMAT])
        record = PreviewRecord(
            token=token,
            index=index,
            step=step,
            width=image.width,
            height=image.height,
            format=PREVIEW_FORMAT,
            storage_key=key,
        )
        try:
            with self.db.write() as conn:
                stored = preview_store.insert_preview(
                    conn,
                    worker_id=self.worker_id,
                    task_id=task.id,
                    record=record,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    expires_at=utcnow() + self.retention,
                )
        except CogviewError:
            self.storage.delete(key)
            raise
        if not stored:  # no longer this worker's task, or stored meanwhile: the file is nobody's
            self.storage.delete(key)
        return stored
