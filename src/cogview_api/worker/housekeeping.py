"""Housekeeping, on its own timer rather than between batches.

Every pass: this worker's heartbeat (its row, registered again if it was pruned), and the
sweep of files it stored for tasks whose completing write failed. Then, by one process at a
time (on PostgreSQL a transaction-level advisory lock that every other worker's pass skips
over; SQLite's one writer lock does the same there): lapsed leases back to the queue (or
failed with refunds after max_attempts), rows of workers killed without a goodbye pruned, and
every `CLEANUP_EVERY_S` the files of images past their retention deleted.

A pass runs every `interval(settings)`: a third of the lease, at most `HOUSEKEEPING_EVERY_S`,
so a worker beats several times within `worker_stale_seconds` and a lapsed lease is back in
the queue a few seconds after it lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.errors import CogviewError
from cogview_api.store import queue
from cogview_api.store import tasks as task_store

if TYPE_CHECKING:
    from cogview_api.worker.loop import Worker

log = logging.getLogger(__name__)

HOUSEKEEPING_EVERY_S = 5.0
CLEANUP_EVERY_S = 300.0


def interval(settings: Settings) -> float:
    return min(settings.lease_seconds / 3, HOUSEKEEPING_EVERY_S)


def housekeep(worker: Worker) -> bool:
    """One pass. Returns whether this process did the shared part (it held the lock)."""
    now = time.monotonic()
    cleanup_due = now - worker._last_cleanup >= CLEANUP_EVERY_S
    expired: list[tuple[str, str]] = []
    with worker.db.write() as conn:
        # A stopping worker whose row is gone was handed back (supervisor.py): it stays gone.
        if not queue.heartbeat_worker(conn, worker_id=worker.id) and not worker.stop.is_set():
            log.warning("worker %s: its row was pruned; registering again", worker.id)
            queue.register_worker(
                conn, worker_id=worker.id, model=worker.engine.name, device=worker.engine.device
            )
        shared = queue.take_housekeeping_lock(conn)
        if shared:
            queue.prune_workers(conn, stale_seconds=worker.settings.worker_stale_seconds)
            queue.reclaim_expired(conn)
            if cleanup_due:
                expired = task_store.expired_images(conn, utcnow())
    worker.healthy = True
    _sweep_unrecorded(worker)
    if shared and cleanup_due:
        worker._last_cleanup = now
        for _, key in expired:
            worker.storage.delete(key)
        if expired:
            with worker.db.write() as conn:
                task_store.mark_images_deleted(conn, [token for token, _ in expired])
    return shared


def _sweep_unrecorded(worker: Worker) -> None:
    """Delete stored files whose task was not completed with them (the completing write
    failed: database down, say), once the database answers again. A file whose image row
    exists stays: the commit went through after all."""
    records = worker.take_unrecorded()
    if not records:
        return
    try:
        with worker.db.read() as conn:
            orphans = [r for r in records if task_store.find_image(conn, r.token) is None]
    except CogviewError:
        worker.unrecorded(records)  # the database is still down: at the next pass
        raise
    for r in orphans:
        try:
            worker.storage.delete(r.storage_key)
        except Exception:  # noqa: BLE001 - a leftover file is no reason to stop the worker
            log.warning("could not delete the unrecorded image file %s", r.storage_key)


class HousekeepingTimer:
    """Runs `housekeep` every `interval(settings)` on a thread of its own, from `start` until
    `stop`; a failed pass (database down) marks the worker unhealthy and is tried again."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"housekeeping-{worker.id}"
        )

    def start(self) -> HousekeepingTimer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        every = interval(self.worker.settings)
        while True:
            try:
                housekeep(self.worker)
            except CogviewError as exc:
                log.warning("worker %s: housekeeping: %s", self.worker.id, exc.message)
                self.worker.healthy = False
            except Exception:  # a bug: logged, and tried again at the next pass
                log.exception("worker %s: housekeeping failed", self.worker.id)
            if self._stop.wait(every):
                return
