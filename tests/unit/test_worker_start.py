"""A worker whose database refuses writes at its start keeps trying and starts once it can
(issue: hardening, finding 6: the worker thread died at once, silently, and nothing restarted
it, so the process served with no worker)."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from cogview_api.config import Settings
from cogview_api.storage import open_storage
from cogview_api.store import queue
from cogview_api.store.db import Database
from cogview_api.worker.loop import Worker
from cogview_api.worker.supervisor import WorkerThread, stop_workers
from tests.support import FlakyEngine, unwritable


def _ready(db: Database) -> int:
    with db.read() as conn:
        return queue.ready_workers(conn, within_seconds=60)


def test_a_worker_waits_out_an_unwritable_database_then_starts(
    db: Database, settings: Settings
) -> None:
    worker = Worker(
        settings=settings.model_copy(update={"poll_interval": 0.05}),
        db=db,
        storage=open_storage(settings.storage_url),
        engine=FlakyEngine(),
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    try:
        with unwritable(db, sqlite_fault="read-only"):
            thread.start()
            time.sleep(0.5)  # several tries, with the back-off
            assert thread.is_alive()
            assert _ready(db) == 0
        deadline = time.monotonic() + 10
        while _ready(db) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ready(db) == 1
    finally:
        worker.shutdown()
        thread.join(timeout=10)
    assert not thread.is_alive()


def test_an_idle_worker_stops_without_saying_it_waits_for_a_batch(
    db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A stop with nothing in hand (the common SIGTERM) does not log that it is finishing a
    batch (it used to, for every live worker thread); it says which workers stopped."""
    worker = Worker(
        settings=settings.model_copy(update={"poll_interval": 0.05}),
        db=db,
        storage=open_storage(settings.storage_url),
        engine=FlakyEngine(),
    )
    thread = WorkerThread(worker).start()
    deadline = time.monotonic() + 10
    while _ready(db) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ready(db) == 1
    with caplog.at_level(logging.INFO, logger="cogview_api.worker.supervisor"):
        stop_workers([thread], grace=30)
    assert not thread.is_alive()
    assert "finishing the batch in hand" not in caplog.text
    assert f"stopped and deregistered worker(s) {worker.id}" in caplog.text
    assert _ready(db) == 0
