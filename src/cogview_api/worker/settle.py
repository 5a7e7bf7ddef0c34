"""The settle stage: a finished batch's images encoded, stored and recorded on a thread of
their own, while the worker claims and denoises the next batch.

Encoding four 1024x1024 PNGs and uploading them takes hundreds of milliseconds of a CPU core
(more with S3); done between batches, the GPU waited that long each time. Here one batch
settles at a time: handing over the next waits for the one before, so at most two batches'
images are in memory (one settling, one just decoded). A batch's leases are renewed until it
has settled; a failure to store fails that task with its refund; a stopping worker settles the
batch in hand before it goes (`Worker.run` drains the stage), and a hand-back (grace run out)
puts the settling tasks back in the queue, their late completing writes then fenced off.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING

from cogview_api.domain import ImageRecord, Stage, Task, new_image_token
from cogview_api.errors import CogviewError
from cogview_api.log_context import task_context
from cogview_api.media import CONTENT_TYPES
from cogview_api.storage import ImageStorage
from cogview_api.store import tasks as task_store
from cogview_api.worker.encode import encode_image
from cogview_api.worker.metering import BatchMeter

if TYPE_CHECKING:
    from PIL.Image import Image

    from cogview_api.worker.loop import Worker

log = logging.getLogger(__name__)


def result_count_error(batch: Sequence[Task], results: Sequence[Sequence[object]]) -> str | None:
    """What is wrong with an engine's results for `batch` (one list per task, each of its
    `n` images or empty for a stopped task), or None. A wrong count fails the whole batch at
    once with refunds: which result belongs to which task cannot be known."""
    if len(results) != len(batch):
        return f"The engine returned {len(results)} results for a batch of {len(batch)} tasks."
    for task, imgs in zip(batch, results, strict=True):
        if imgs and len(imgs) != len(task.seeds):
            return f"The engine returned {len(imgs)} images for a task of {len(task.seeds)}."
    return None


class SettleStage:
    """Settles one batch at a time on its own thread (see the module's docstring)."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._pool: ThreadPoolExecutor | None = None
        self._settling: Future[None] | None = None

    def submit(
        self,
        batch: Sequence[Task],
        results: Sequence[Sequence[Image]],
        *,
        meter: BatchMeter,
        done: Callable[[], None],
        started: float,
    ) -> None:
        """Settle `batch` once the batch before it has settled; `done` runs after (it stops
        the batch's lease renewal)."""
        self.drain()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="settle")
        self._settling = self._pool.submit(self._settle, batch, results, meter, done, started)

    def drain(self) -> None:
        """Wait until the batch settling (if any) has settled. A bug in it is raised here."""
        settling, self._settling = self._settling, None
        if settling is not None:
            settling.result()

    @property
    def busy(self) -> bool:
        return self._settling is not None and not self._settling.done()

    def _settle(
        self,
        batch: Sequence[Task],
        results: Sequence[Sequence[Image]],
        meter: BatchMeter,
        done: Callable[[], None],
        started: float,
    ) -> None:
        w = self.worker
        try:
            saving = [t.id for t, imgs in zip(batch, results, strict=True) if imgs]
            held = self._mark_saving(saving)
            for task, imgs in zip(batch, results, strict=True):
                with task_context(task.id, task.request_id):
                    if not imgs:  # the engine stopped it: cancelled, or no longer ours
                        log.info("task %s stopped: no longer held by worker %s", task.id, w.id)
                        outcome = "stopped"
                    elif task.id not in held:  # cancelled (or lease lost) while decoding
                        log.info(
                            "task %s stopped before saving: no longer held by %s", task.id, w.id
                        )
                        outcome = "stopped"
                    else:
                        outcome = self._finish(task, imgs, meter)
                    w._log_done(task, outcome, started, len(batch))
        finally:
            done()

    def _mark_saving(self, task_ids: Sequence[str]) -> set[str]:
        """One write for the batch: its tasks SAVING. The ids still held (all of them if the
        write failed: completing, fenced, decides then)."""
        if not task_ids:
            return set()
        w = self.worker
        try:
            with w.db.write() as conn:
                held = task_store.record_progress(
                    conn, worker_id=w.id, progress={i: (Stage.SAVING, None) for i in task_ids}
                )
        except CogviewError as exc:
            log.warning("tasks %s not marked saving: %s", list(task_ids), exc.message)
            return set(task_ids)
        for task_id in held:
            w._changed(task_id)
        return held

    def _finish(self, task: Task, imgs: Sequence[Image], meter: BatchMeter) -> str:
        """Store the images and complete the task; returns the outcome for the task's line."""
        w = self.worker
        records: list[ImageRecord] = []
        try:
            storing = time.perf_counter()
            records = store_images(w.storage, task, imgs, records)
            with w.db.write() as conn:
                completed = task_store.complete_task(
                    conn,
                    task_id=task.id,
                    worker_id=w.id,
                    records=records,
                    retention=timedelta(days=w.settings.retention_days),
                )
            if not completed:  # cancelled or lost the lease meanwhile: the files are nobody's
                for r in records:
                    w.storage.delete(r.storage_key)
            else:
                meter.stored(time.perf_counter() - storing)
                meter.completed(task)
            w._changed(task.id)
            return "completed" if completed else "stopped"
        except Exception:
            log.exception("could not store the images of task %s", task.id)
            # Files written, but was the task settled with them? A database that dropped the
            # connection may or may not have committed; decided at the next housekeeping.
            w.unrecorded(records)
            w._fail(task, "The images could not be stored.", meter)
            return "failed"


def store_images(
    storage: ImageStorage, task: Task, imgs: Sequence[Image], records: list[ImageRecord]
) -> list[ImageRecord]:
    """Encode and store a task's images, appending each stored one's record to `records` as it
    goes (so that a failure midway leaves the stored ones listed, for the sweep)."""
    for index, (image, seed) in enumerate(zip(imgs, task.seeds, strict=True)):
        token = new_image_token()
        key = f"{task.created_at:%Y/%m/%d}/{task.id}/{index}-{token}.{task.output_format}"
        data = encode_image(image, task.output_format, task.output_compression)
        storage.put(key, data, CONTENT_TYPES[task.output_format])
        records.append(
            ImageRecord(
                token=token,
                index=index,
                width=image.width,
                height=image.height,
                seed=seed,
                format=task.output_format,
                storage_key=key,
                size_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
    return records
