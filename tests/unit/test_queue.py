"""The queue and the ledger on real databases (a SQLite file and a PostgreSQL database, via the
`db` and `settings` fixtures): claims, leases, refunds, engine failures."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest, Size, TaskState
from cogview_api.errors import InsufficientCredits
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.storage import LocalStorage
from cogview_api.store import keys as key_store
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.tables import utcnow
from cogview_api.worker.loop import Worker
from tests.support import FlakyEngine

SQUARE = Size(1024, 1024)


def request(size: Size = SQUARE, n: int = 1, prompt: str = "a cat") -> GenerationRequest:
    return GenerationRequest(model="cogview-4", prompt=prompt, size=size, quality="hd", n=n)


def balance_of(db: Database, key_id: str) -> int:
    with db.read() as conn:
        return key_store.get_key(conn, key_id).balance


def test_ledger_is_the_balance(db: Database) -> None:
    key, _ = key_service.create_key(db, name="k", credits=10)
    key_service.grant_credits(db, key_id=key.id, amount=5)
    key_service.grant_credits(db, key_id=key.id, amount=-3)
    with db.read() as conn:
        assert key_store.get_key(conn, key.id).balance == 12
        assert key_store.ledger_sum(conn, key.id) == 12
    with pytest.raises(InsufficientCredits):
        key_service.grant_credits(db, key_id=key.id, amount=-13)
    assert balance_of(db, key.id) == 12


def test_claim_takes_oldest_first_and_only_one_batch_key(db: Database, settings: Settings) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    a = generation.submit(db, settings, key=key, request=request())
    b = generation.submit(db, settings, key=key, request=request(Size(768, 1344)))
    c = generation.submit(db, settings, key=key, request=request())
    with db.write() as conn:
        first = queue.claim_batch(conn, worker_id="w1", limit=4, lease_seconds=30)
    assert first == [a.id, c.id]  # b has another shape
    with db.write() as conn:
        second = queue.claim_batch(conn, worker_id="w2", limit=4, lease_seconds=30)
        third = queue.claim_batch(conn, worker_id="w3", limit=4, lease_seconds=30)
    assert second == [b.id] and third == []
    with db.read() as conn:
        task = task_store.get_task(conn, a.id)
    assert task.state is TaskState.RUNNING and task.worker_id == "w1" and task.attempts == 1


def test_lapsed_lease_requeues_then_fails_with_refund(db: Database, settings: Settings) -> None:
    key, _ = key_service.create_key(db, name="k", credits=8)
    task = generation.submit(db, settings, key=key, request=request(n=2))
    assert balance_of(db, key.id) == 0
    later = utcnow() + timedelta(seconds=120)
    for attempt in range(1, settings.max_attempts + 1):
        with db.write() as conn:
            assert queue.claim_batch(conn, worker_id=f"w{attempt}", limit=1, lease_seconds=1)
        with db.write() as conn:
            requeued, failed = queue.reclaim_expired(conn, now=later)
        expected = (0, 1) if attempt == settings.max_attempts else (1, 0)
        assert (requeued, failed) == expected
    with db.read() as conn:
        done = task_store.get_task(conn, task.id)
        assert key_store.ledger_sum(conn, key.id) == 8
    assert done.state is TaskState.FAILED and done.credits_refunded == 8
    assert done.error_type == "server_error" and "abandoned" in (done.error_message or "")
    assert balance_of(db, key.id) == 8


def test_a_worker_that_lost_its_lease_cannot_settle_the_task(
    db: Database, settings: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=8)
    task = generation.submit(db, settings, key=key, request=request())
    with db.write() as conn:
        queue.claim_batch(conn, worker_id="old", limit=1, lease_seconds=1)
        queue.reclaim_expired(conn, now=utcnow() + timedelta(seconds=5))
        queue.claim_batch(conn, worker_id="new", limit=1, lease_seconds=30)
    with db.write() as conn:
        assert not task_store.fail_task(
            conn,
            task_id=task.id,
            worker_id="old",
            error_code=500,
            error_type="server_error",
            message="late",
        )
        assert not task_store.complete_task(
            conn, task_id=task.id, worker_id="old", records=[], retention=timedelta(days=1)
        )
    with db.read() as conn:
        assert task_store.get_task(conn, task.id).worker_id == "new"


def test_engine_failure_fails_that_task_with_refund_and_the_worker_goes_on(
    tmp_path: Path, settings: Settings, db: Database
) -> None:
    settings = settings.model_copy(update={"steps_hd": 3})
    key, _ = key_service.create_key(db, name="k", credits=8)
    bad = generation.submit(db, settings, key=key, request=request(prompt="oom please"))
    good = generation.submit(db, settings, key=key, request=request(Size(768, 1344)))
    engine = FlakyEngine()
    worker = Worker(settings=settings, db=db, storage=LocalStorage(tmp_path / "img"), engine=engine)
    assert worker.run_once() and worker.run_once() and not worker.run_once()
    assert engine.calls == [bad.id, good.id]
    with db.read() as conn:
        failed = task_store.get_task(conn, bad.id)
        done = task_store.get_task(conn, good.id)
    assert failed.state is TaskState.FAILED and failed.credits_refunded == 4
    assert failed.error_message == "The GPU ran out of memory for this task."
    assert done.state is TaskState.COMPLETED and done.step == 3 and done.percent == 100
    assert [(i.width, i.height) for i in done.images] == [(768, 1344)]
    assert balance_of(db, key.id) == 4  # the good image is paid, the failed one refunded
    stored = LocalStorage(tmp_path / "img").get(done.images[0].storage_key)
    assert stored is not None and stored.startswith(b"\x89PNG")
