"""The workers' registry on both databases, and the worker thread's supervisor (issue:
hardening, findings 5 and 6: rows of SIGKILLed workers were never pruned, so /readyz counted 5
workers with 1 alive; a worker thread that died was never restarted)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from datetime import timedelta

import pytest
from PIL import Image
from sqlalchemy import select, update

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest, Size
from cogview_api.engine import EngineJob, ProgressFn
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.storage import open_storage
from cogview_api.store import queue
from cogview_api.store.db import Database
from cogview_api.store.tables import workers
from cogview_api.worker.loop import Worker
from cogview_api.worker.supervisor import WorkerThread
from tests.support import FlakyEngine


def worker_ids(db: Database) -> set[str]:
    with db.read() as conn:
        return set(conn.execute(select(workers.c.id)).scalars())


def make_worker(db: Database, settings: Settings, engine: object = None) -> Worker:
    return Worker(
        settings=settings,
        db=db,
        storage=open_storage(settings.storage_url),
        engine=engine or FlakyEngine(),  # type: ignore[arg-type]
    )


def test_a_worker_pass_prunes_the_rows_of_dead_workers(db: Database, settings: Settings) -> None:
    with db.write() as conn:
        for worker_id in ("killed", "alive"):
            queue.register_worker(conn, worker_id=worker_id, model="tiny", device="cpu")
        stale = utcnow() - timedelta(seconds=settings.worker_stale_seconds + 1)
        conn.execute(update(workers).where(workers.c.id == "killed").values(heartbeat_at=stale))
    worker = make_worker(db, settings)
    assert not worker.run_once()  # nothing queued: housekeeping only
    # Its own row is back too: a worker pruned while it could not write registers again.
    assert worker_ids(db) == {"alive", worker.id}


class SlowEngine:
    """Denoises for `seconds` in one batch, longer than several leases."""

    name = "slow"
    device = "cpu"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.started = threading.Event()

    def generate(self, jobs: Sequence[EngineJob], progress: ProgressFn) -> list[list[Image.Image]]:
        self.started.set()
        time.sleep(self.seconds)
        return [[Image.new("RGB", (j.width, j.height)) for _ in j.seeds] for j in jobs]


def test_a_worker_deep_in_a_long_batch_is_not_pruned(db: Database, settings: Settings) -> None:
    settings = settings.model_copy(update={"lease_seconds": 0.6})  # renewed every 0.2 s
    key, _ = key_service.create_key(db, name="k", credits=10)
    request = GenerationRequest(
        model="cogview-4", prompt="a cat", size=Size(512, 512), quality="hd", n=1
    )
    generation.submit(db, settings, key=key, request=request)
    engine = SlowEngine(seconds=2.0)
    thread = WorkerThread(make_worker(db, settings, engine)).start()
    try:
        assert engine.started.wait(10)
        time.sleep(1.2)  # two leases into the batch, with no pass of the loop since its start
        with db.write() as conn:
            assert queue.prune_workers(conn, stale_seconds=0.5) == 0
        assert worker_ids(db) == {thread.worker.id}
    finally:
        thread.worker.shutdown()
        thread.join(timeout=10)


class CrashingWorker(Worker):
    """A worker whose loop hits a bug on its first `crashes` passes."""

    crashes = 2

    def poll(self) -> bool:
        if self.crashes:
            self.crashes -= 1
            raise RuntimeError("a bug in the claim loop")
        return super().poll()


def test_a_crashed_worker_loop_is_restarted_with_backoff_and_logged(
    db: Database, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    worker = CrashingWorker(
        settings=settings, db=db, storage=open_storage(settings.storage_url), engine=FlakyEngine()
    )
    thread = WorkerThread(worker, backoff=(0.05, 1.0)).start()
    try:
        # `live` is already true between a registration and the crash that follows it, so
        # wait for the restarts first, then for the third run to be up.
        deadline = time.monotonic() + 10
        while not (thread.restarts == 2 and thread.live) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert thread.restarts == 2
        assert thread.live
        assert worker_ids(db) == {worker.id}  # registered again after each crash
    finally:
        worker.shutdown()
        thread.join(timeout=10)
    crashes = [r for r in caplog.records if "crashed; restarting" in r.getMessage()]
    assert [r.levelno for r in crashes] == [logging.ERROR, logging.ERROR]
    assert "0.05 s" in crashes[0].getMessage() and "0.1 s" in crashes[1].getMessage()
    assert crashes[0].exc_info is not None  # the traceback of the bug is in the log
    assert not thread.is_alive() and worker_ids(db) == set()
