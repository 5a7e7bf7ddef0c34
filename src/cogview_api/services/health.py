"""Readiness: whether any worker has the model loaded, read from the workers' registry."""

from __future__ import annotations

from cogview_api.config import Settings
from cogview_api.errors import ServiceUnavailable
from cogview_api.store import queue
from cogview_api.store.db import Database


def ready_workers(db: Database, settings: Settings) -> int:
    """Workers with the model loaded whose last heartbeat is at most three leases (and at
    least 30 s) old. Raises ServiceUnavailable when the database cannot answer."""
    with db.read() as conn:
        return queue.ready_workers(conn, within_seconds=settings.worker_stale_seconds)


# A SQLite database needs room on its disk for the pages and WAL frames of the next writes. The
# probe below is rolled back, so it never reaches the disk: a disk this close to full is said
# to be full before the writes fail on it.
MIN_FREE_BYTES = 1 << 20


def check_writable(db: Database) -> None:
    """Raises ServiceUnavailable unless the database takes a write now, in this process
    whether or not it runs workers: a write that leaves nothing behind, refused by a read-only
    SQLite file or PostgreSQL server, and on SQLite one that needs new pages, refused by a full
    database (`queue.touch`), or a disk with less than MIN_FREE_BYTES free."""
    free = db.disk_free()
    if free is not None and free < MIN_FREE_BYTES:
        raise ServiceUnavailable("The database's disk is full.")
    with db.write() as conn:
        queue.touch(conn)
