"""The worker: claims tasks from the store, runs the engine, stores images, settles the task.

One worker drives one engine (one GPU). It can run as a thread inside `cogview-api serve` or
as its own process (`cogview-api worker`); either way all coordination goes through the
database, so any number of workers and API processes can share one queue.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import BatchKey, ImageRecord, Stage, Task, new_image_token
from cogview_api.engine import Engine, EngineJob
from cogview_api.errors import CogviewError, EngineError
from cogview_api.log_context import task_context
from cogview_api.media import CONTENT_TYPES
from cogview_api.storage import ImageStorage
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.worker.encode import encode_image
from cogview_api.worker.metering import BatchMeter
from cogview_api.worker.previews import PreviewWriter

if TYPE_CHECKING:
    from PIL.Image import Image

log = logging.getLogger(__name__)

CLEANUP_EVERY_S = 300.0


def new_worker_id() -> str:
    return f"{socket.gethostname()[:40]}-{secrets.token_hex(4)}"


# The longest wait between two tries to register at the start (doubling from poll_interval).
REGISTER_BACKOFF_MAX_S = 30.0


class Worker:
    def __init__(
        self,
        *,
        settings: Settings,
        db: Database,
        storage: ImageStorage,
        engine: Engine,
        worker_id: str | None = None,
        on_changed: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.db = db
        self.storage = storage
        self.engine = engine
        self.id = worker_id or new_worker_id()
        # Called with a task's id after each write that moves it (progress, settle), so the
        # API of the same process tells its streams at once.
        self.on_changed = on_changed
        self.stop = threading.Event()
        # Set when there may be new work, so an idle worker starts at once instead of at its
        # next poll: by an API in the same process on submit, and on PostgreSQL by the
        # process's LISTEN connection (store/notify.py). The poll stays as the fallback.
        self.wake = threading.Event()
        self._last_cleanup = 0.0
        # API key -> tasks of it in this worker's previous batch: the claim's fairness load.
        self._recent: dict[str, int] = {}
        # Images stored for a task whose settling write failed; see _sweep_unrecorded.
        self._unrecorded: list[ImageRecord] = []
        self._meter: BatchMeter | None = None  # the batch in hand's, for the metrics
        # Registered and its last housekeeping write went through: what /readyz counts.
        self.healthy = False

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> None:
        """Claim and run batches until `stop` is set. Never raises for one bad task (it fails
        that task), nor for a database that is unavailable or cannot be written (it tries
        again, backing off at the start); other errors are bugs, raised after deregistering,
        for `WorkerThread` to restart the loop with a backoff."""
        if not self._register():
            return
        try:
            while not self.stop.is_set():
                # Cleared before the claim looks at the queue, so a wake-up that arrives while
                # it runs is not lost: the wait below then returns at once.
                self.wake.clear()
                try:
                    worked = self.run_once()
                except CogviewError as exc:  # database briefly unavailable, and the like
                    log.warning("worker %s: %s", self.id, exc.message)
                    self.healthy = False
                    worked = False
                # Anything else is a bug: it ends this run (deregistered below), and the
                # thread's supervisor (worker/supervisor.py) logs it and starts the loop
                # again after a backoff; leases protect the tasks.
                if not worked:
                    self.wake.wait(self.settings.poll_interval)
        finally:
            self.healthy = False
            try:
                with self.db.write() as conn:
                    queue.unregister_worker(conn, worker_id=self.id)
            except CogviewError:
                pass

    def _register(self) -> bool:
        """Announce this worker (for /readyz), retrying while the database refuses: a thread
        that died here would leave the process serving with no worker. False if stopped first."""
        delay = self.settings.poll_interval
        while not self.stop.is_set():
            try:
                with self.db.write() as conn:
                    queue.register_worker(
                        conn, worker_id=self.id, model=self.engine.name, device=self.engine.device
                    )
            except CogviewError as exc:
                log.warning("worker %s: cannot start yet: %s", self.id, exc.message)
            except Exception:  # a bug; keep trying rather than die unseen
                log.exception("worker %s: unexpected error at its start", self.id)
            else:
                log.info("worker %s ready on %s", self.id, self.engine.device)
                self.healthy = True
                return True
            log.info("worker %s: trying again in %g s", self.id, delay)
            self.stop.wait(delay)
            delay = min(delay * 2, REGISTER_BACKOFF_MAX_S)
        return False

    def shutdown(self) -> None:
        """Stop claiming; the batch in hand runs on (see `hand_back`)."""
        self.stop.set()
        self.wake.set()

    def hand_back(self) -> int:
        """The batch in hand back to the queue, uncounted, and this worker's row gone: for a
        shutdown whose grace ran out. Returns how many tasks went back."""
        with self.db.write() as conn:
            released = queue.release_worker_tasks(conn, worker_id=self.id)
            queue.unregister_worker(conn, worker_id=self.id)
        return released

    def run_once(self) -> bool:
        """One pass: housekeeping, then at most one batch. True if a batch ran."""
        with self.db.write() as conn:
            if not queue.heartbeat_worker(conn, worker_id=self.id):
                log.warning("worker %s: its row was pruned; registering again", self.id)
                queue.register_worker(
                    conn, worker_id=self.id, model=self.engine.name, device=self.engine.device
                )
            queue.prune_workers(conn, stale_seconds=self.settings.worker_stale_seconds)
            queue.reclaim_expired(conn)
        self.healthy = True
        self._sweep_unrecorded()
        self._cleanup_expired_images()
        with self.db.write() as conn:
            ids = queue.claim_batch(
                conn,
                worker_id=self.id,
                limit=self.settings.max_batch_size,
                lease_seconds=self.settings.lease_seconds,
                recent=self._recent,
            )
        if not ids:
            self._recent = {}  # an idle spell: nobody is owed a turn
            return False
        batch = self._load(ids)
        batch += self._top_up(batch)
        self._recent = dict(Counter(t.key_id for t in batch))
        self.run_batch(batch)
        return True

    def _top_up(self, batch: Sequence[Task]) -> list[Task]:
        """Dynamic batching: a claim short of max_batch_size waits up to `batch_timeout` for
        more tasks of the same batch key and claims them too. Each look is its own short
        transaction; no transaction stays open while waiting. The first tasks' leases
        (at least seconds long) outlast the wait."""
        room = self.settings.max_batch_size - len(batch)
        if room <= 0 or self.settings.batch_timeout <= 0:
            return []
        key = BatchKey.of(batch[0])
        deadline = time.monotonic() + self.settings.batch_timeout
        more: list[str] = []
        while room > 0 and not self.stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Woken by a submit (in process, or NOTIFY), else one look per poll interval
            # and a last one at the deadline.
            self.wake.wait(min(left, self.settings.poll_interval))
            self.wake.clear()
            try:
                with self.db.write() as conn:
                    got = queue.claim_batch(
                        conn,
                        worker_id=self.id,
                        limit=room,
                        lease_seconds=self.settings.lease_seconds,
                        batch_key=key,
                    )
            except CogviewError as exc:  # run what we have; these tasks are ours already
                log.warning("worker %s: topping up the batch: %s", self.id, exc.message)
                break
            more += got
            room -= len(got)
        return self._load(more)

    def _load(self, ids: Sequence[str]) -> list[Task]:
        if not ids:
            return []
        with self.db.read() as conn:
            return [task_store.get_task(conn, task_id) for task_id in ids]

    # -- one batch ------------------------------------------------------------------------

    def run_batch(self, batch: Sequence[Task]) -> None:
        ids = [t.id for t in batch]
        self._meter = BatchMeter(batch)
        renewer = _LeaseRenewer(self, ids)
        renewer.start()
        started = time.monotonic()
        try:
            jobs = [EngineJob.from_task(t) for t in batch]
            try:
                results = self._generate(jobs, batch)
            except EngineError as exc:
                for t in batch:
                    with task_context(t.id, t.request_id):
                        log.warning("engine failed on this task's batch: %s", exc.message)
                        self._fail(t, exc.message)
                        self._log_done(t, "failed", started, len(batch))
                return
            except Exception:  # a bug in the engine must not take the worker down
                log.exception("unexpected engine failure on batch %s", ids)
                for t in batch:
                    with task_context(t.id, t.request_id):
                        log.error("engine failed on this task's batch (traceback above)")
                        self._fail(t, "The engine failed on this task.")
                        self._log_done(t, "failed", started, len(batch))
                return
            for task, imgs in zip(batch, results, strict=True):
                with task_context(task.id, task.request_id):
                    if imgs:
                        outcome = self._finish(task, imgs)
                    else:  # the engine stopped it: cancelled, or its lease went to another worker
                        log.info("task %s stopped: no longer held by worker %s", task.id, self.id)
                        outcome = "stopped"
                    self._log_done(task, outcome, started, len(batch))
        finally:
            renewer.stop()

    def _generate(self, jobs: Sequence[EngineJob], batch: Sequence[Task]) -> list[list[Image]]:
        """The engine's call, with a preview writer when a task of the batch asked for any."""
        if not any(t.previews for t in batch):
            return self.engine.generate(jobs, self._progress)
        writer = PreviewWriter(
            db=self.db,
            storage=self.storage,
            worker_id=self.id,
            batch=batch,
            retention=timedelta(days=self.settings.retention_days),
            on_changed=self._changed,
        )
        return self.engine.generate(jobs, self._progress, writer)

    def _log_done(self, task: Task, outcome: str, started: float, batch_size: int) -> None:
        """The one info line per task this worker ran: what it was, how long it waited and ran,
        how it ended (completed, failed, or stopped: cancelled or no longer this worker's).
        Never the prompt."""
        run_s = time.monotonic() - started
        wait_s = (task.started_at - task.created_at).total_seconds() if task.started_at else 0.0
        images = task.n if outcome == "completed" else 0
        log.info(
            "task %s %s: %dx%d %s, %d image(s), waited %.2f s, ran %.2f s (batch of %d)",
            task.id,
            outcome,
            task.width,
            task.height,
            task.quality,
            images,
            wait_s,
            run_s,
            batch_size,
            extra={
                "outcome": outcome,
                "size": f"{task.width}x{task.height}",
                "quality": str(task.quality),
                "images": images,
                "queue_wait_s": round(wait_s, 3),
                "run_s": round(run_s, 3),
                "batch_size": batch_size,
                "attempt": task.attempts,
            },
        )

    def _progress(self, task_id: str, stage: str, step: int) -> bool:
        """Record a step. False when the task is no longer this worker's to run (cancelled, or
        its lease lapsed): the fenced write then matches no row, and the engine stops."""
        if self._meter is not None:
            self._meter.step(task_id)
        try:
            with self.db.write() as conn:
                held = task_store.set_progress(
                    conn, task_id=task_id, worker_id=self.id, stage=Stage(stage), step=step
                )
        except CogviewError as exc:  # a missed progress write is no reason to stop the task
            log.warning("progress of task %s not recorded: %s", task_id, exc.message)
            return True
        if held:
            self._changed(task_id)
        return held

    def _finish(self, task: Task, imgs: Sequence[Image]) -> str:
        """Store the images and complete the task; returns the outcome for the task's line."""
        records: list[ImageRecord] = []
        try:
            with self.db.write() as conn:
                held = task_store.set_progress(
                    conn, task_id=task.id, worker_id=self.id, stage=Stage.SAVING
                )
            if not held:  # cancelled (or lease lost) while decoding: store nothing
                log.info("task %s stopped before saving: no longer held by %s", task.id, self.id)
                return "stopped"
            storing = time.perf_counter()
            for index, (image, seed) in enumerate(zip(imgs, task.seeds, strict=True)):
                token = new_image_token()
                key = f"{task.created_at:%Y/%m/%d}/{task.id}/{index}-{token}.{task.output_format}"
                data = encode_image(image, task.output_format, task.output_compression)
                self.storage.put(key, data, CONTENT_TYPES[task.output_format])
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
            with self.db.write() as conn:
                done = task_store.complete_task(
                    conn,
                    task_id=task.id,
                    worker_id=self.id,
                    records=records,
                    retention=timedelta(days=self.settings.retention_days),
                )
            if not done:  # cancelled or lost the lease meanwhile: the files are nobody's
                for r in records:
                    self.storage.delete(r.storage_key)
            elif self._meter is not None:
                self._meter.stored(time.perf_counter() - storing)
                self._meter.completed(task)
            self._changed(task.id)
            return "completed" if done else "stopped"
        except Exception:
            log.exception("could not store the images of task %s", task.id)
            # Files written, but was the task settled with them? A database that dropped the
            # connection may or may not have committed; decided at the next look (_sweep).
            self._unrecorded.extend(records)
            self._fail(task, "The images could not be stored.")
            return "failed"

    def _sweep_unrecorded(self) -> None:
        """Delete stored files whose task was not completed with them (the completing write
        failed: database down, say), once the database answers again. A file whose image row
        exists stays: the commit went through after all."""
        if not self._unrecorded:
            return
        with self.db.read() as conn:  # raises while the database is down: try again later
            orphans = [r for r in self._unrecorded if task_store.find_image(conn, r.token) is None]
        self._unrecorded = []
        for r in orphans:
            try:
                self.storage.delete(r.storage_key)
            except Exception:  # noqa: BLE001 - a leftover file is no reason to stop the worker
                log.warning("could not delete the unrecorded image file %s", r.storage_key)

    def _fail(self, task: Task, message: str) -> None:
        try:
            with self.db.write() as conn:
                failed = task_store.fail_task(
                    conn,
                    task_id=task.id,
                    worker_id=self.id,
                    error_code=500,
                    error_type="server_error",
                    message=message,
                )
        except CogviewError:
            log.exception("could not mark task %s failed; its lease will run out", task.id)
        else:
            if failed and self._meter is not None:
                self._meter.failed(task)
        self._changed(task.id)

    def _changed(self, task_id: str) -> None:
        if self.on_changed is not None:
            self.on_changed(task_id)

    def _cleanup_expired_images(self) -> None:
        now = time.monotonic()
        if now - self._last_cleanup < CLEANUP_EVERY_S:
            return
        self._last_cleanup = now
        with self.db.read() as conn:
            expired = task_store.expired_images(conn, utcnow())
        for _, key in expired:
            self.storage.delete(key)
        with self.db.write() as conn:
            task_store.mark_images_deleted(conn, [token for token, _ in expired])


class _LeaseRenewer:
    """Renews the batch's leases, and the worker's heartbeat (so that a long batch is not taken
    for a dead worker and pruned), every third of the lease while the engine works."""

    def __init__(self, worker: Worker, task_ids: list[str]) -> None:
        self.worker = worker
        self.task_ids = task_ids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="lease-renewer")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = self.worker.settings.lease_seconds / 3
        while not self._stop.wait(interval):
            try:
                with self.worker.db.write() as conn:
                    queue.renew_leases(
                        conn,
                        worker_id=self.worker.id,
                        task_ids=self.task_ids,
                        lease_seconds=self.worker.settings.lease_seconds,
                    )
                    queue.heartbeat_worker(conn, worker_id=self.worker.id)
            except CogviewError as exc:
                log.warning("lease renewal failed: %s", exc.message)
