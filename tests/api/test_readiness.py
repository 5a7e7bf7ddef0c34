"""/readyz says whether this process can take and run work (issue: hardening, findings 5 and 6:
it counted the rows of dead workers, and said ready on a database that refused writes)."""

from __future__ import annotations

import time

import httpx
import pytest

from cogview_api.storage import open_storage
from cogview_api.store import queue
from cogview_api.worker.loop import Worker
from cogview_api.worker.supervisor import WorkerThread
from tests.api.test_bad_input import assert_error
from tests.support import FlakyEngine, InProcessApi, unwritable


def assert_not_ready(r: httpx.Response, reason: str) -> None:
    assert_error(r, 503, "service_unavailable")
    assert r.headers["retry-after"] == "5"
    assert r.json()["error"]["message"] == reason


@pytest.mark.parametrize("fault", ["read-only", "full"])
def test_readyz_is_503_while_the_database_refuses_writes(api: InProcessApi, fault: str) -> None:
    """An API-only process (no workers of its own, as `serve --workers 0`): a read-only
    database, or a full one (on SQLite a write that needs a new page fails, while one that
    changes a row in place still passes), is not ready. On PostgreSQL both are its read-only
    fault."""
    with api.db.write() as conn:
        queue.register_worker(conn, worker_id="w1", model="tiny", device="cpu")
    assert api.client.get("/readyz").json() == {"status": "ready", "workers": 1}
    with unwritable(api.db, sqlite_fault=fault):
        assert_not_ready(api.client.get("/readyz"), "The database cannot take writes.")
    assert api.client.get("/readyz").status_code == 200  # recovered, same process


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_readyz_is_503_while_the_sqlite_disk_is_nearly_full(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writability probe is rolled back, so it never reaches the disk: the free space on
    the database file's disk is read as well. Here the floor is raised above what is free."""
    from cogview_api.services import health

    with api.db.write() as conn:
        queue.register_worker(conn, worker_id="w1", model="tiny", device="cpu")
    assert api.client.get("/readyz").status_code == 200
    free = api.db.disk_free()
    assert free is not None
    monkeypatch.setattr(health, "MIN_FREE_BYTES", free + (1 << 30))
    assert_not_ready(api.client.get("/readyz"), "The database cannot take writes.")
    monkeypatch.undo()
    assert api.client.get("/readyz").status_code == 200


def test_readyz_counts_this_process_live_workers(api: InProcessApi) -> None:
    with api.db.write() as conn:  # a worker elsewhere does not make this process ready
        queue.register_worker(conn, worker_id="elsewhere", model="tiny", device="cpu")
    worker = Worker(
        settings=api.settings,
        db=api.db,
        storage=open_storage(api.settings.storage_url),
        engine=FlakyEngine(),
    )
    thread = WorkerThread(worker)
    api.app.state.live_workers = lambda: int(thread.live)  # as `serve` wires its workers
    assert_not_ready(api.client.get("/readyz"), "No worker of this process is running.")
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while (r := api.client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, r.text
            time.sleep(0.05)
        assert r.json() == {"status": "ready", "workers": 1}
    finally:
        worker.shutdown()
        thread.join(timeout=10)
    assert_not_ready(api.client.get("/readyz"), "No worker of this process is running.")
