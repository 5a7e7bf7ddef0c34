"""The queue and the ledger on real databases (a SQLite file and a PostgreSQL database, via the
`db` and `settings` fixtures): claims, leases, refunds, engine failures."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import BatchKey, GenerationRequest, Size, TaskState
from cogview_api.errors import InvalidRequest
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.storage import LocalStorage
from cogview_api.store import keys as key_store
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
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
    # An adjustment below zero is the operator's bad input (400 on amount), not a 402.
    with pytest.raises(InvalidRequest, match="^Insufficient credits") as refused:
        key_service.grant_credits(db, key_id=key.id, amount=-13)
    assert refused.value.param == "amount"
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


# -- fairness between API keys, and topping up a batch -----------------------------------------


def settle(db: Database, worker_id: str, ids: list[str]) -> None:
    """The worker is done with these tasks (failed with a refund: the quickest way to settle)."""
    with db.write() as conn:
        for task_id in ids:
            assert task_store.fail_task(
                conn,
                task_id=task_id,
                worker_id=worker_id,
                error_code=500,
                error_type="server_error",
                message="done",
            )


def claim(db: Database, worker_id: str, limit: int = 4, **kw: object) -> list[str]:
    with db.write() as conn:
        return queue.claim_batch(
            conn,
            worker_id=worker_id,
            limit=limit,
            lease_seconds=30,
            **kw,  # type: ignore[arg-type]
        )


def test_a_key_with_running_tasks_yields_to_a_key_without(db: Database, settings: Settings) -> None:
    heavy, _ = key_service.create_key(db, name="heavy", credits=1000)
    light, _ = key_service.create_key(db, name="light", credits=100)
    backlog = [generation.submit(db, settings, key=heavy, request=request()).id for _ in range(12)]
    assert claim(db, "w1") == backlog[:4]
    same_shape = generation.submit(db, settings, key=light, request=request()).id
    # w1 still holds four of heavy's tasks: light's task goes first, then heavy's oldest.
    assert claim(db, "w2") == [same_shape, *backlog[4:7]]
    other_shape = generation.submit(db, settings, key=light, request=request(Size(768, 1344))).id
    assert claim(db, "w3") == [other_shape]  # its own batch key, ahead of heavy's backlog


def test_one_worker_alternates_keys_after_each_batch(db: Database, settings: Settings) -> None:
    """A single worker: after a batch of heavy's tasks, light's task (another shape) is next,
    not after the hundred. Without the worker's `recent` load it would not be (checked)."""
    heavy, _ = key_service.create_key(db, name="heavy", credits=1000)
    light, _ = key_service.create_key(db, name="light", credits=100)
    backlog = [generation.submit(db, settings, key=heavy, request=request()).id for _ in range(9)]
    first = claim(db, "w")
    assert first == backlog[:4]
    late = generation.submit(db, settings, key=light, request=request(Size(768, 1344))).id
    settle(db, "w", first)
    with db.read() as conn:  # what a claim without the worker's memory would pick
        assert queue._pick_batch_key(conn, {}) == BatchKey(
            1024, 1024, settings.steps_hd, settings.guidance_scale
        )
    assert claim(db, "w", recent={heavy.id: 4}) == [late]
    settle(db, "w", [late])
    assert claim(db, "w", recent={light.id: 1}) == backlog[4:8]


def test_a_claim_for_a_batch_key_takes_only_that_key(db: Database, settings: Settings) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    tall = generation.submit(db, settings, key=key, request=request(Size(768, 1344))).id
    square = generation.submit(db, settings, key=key, request=request()).id
    wanted = BatchKey(1024, 1024, settings.steps_hd, settings.guidance_scale)
    assert claim(db, "w", batch_key=wanted) == [square]
    assert claim(db, "w", batch_key=wanted) == []
    assert claim(db, "w") == [tall]


class BatchRecorder(FlakyEngine):
    """FlakyEngine that also records each batch it was given, as task ids."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []

    def generate(self, jobs, progress):  # type: ignore[no-untyped-def]
        self.batches.append([job.task_id for job in jobs])
        return super().generate(jobs, progress)


@pytest.mark.parametrize("batch_timeout", [0.0, 30.0])
def test_worker_tops_up_a_short_batch_within_batch_timeout(
    tmp_path: Path, settings: Settings, db: Database, batch_timeout: float
) -> None:
    """A claim that got 1 of 3 waits (up to batch_timeout) for two more of its batch key,
    ignoring another shape; with batch_timeout 0 it runs the one it has at once. The wait ends
    as soon as the batch is full, so 30 s is only a bound."""
    import threading

    settings = settings.model_copy(
        update={"max_batch_size": 3, "batch_timeout": batch_timeout, "poll_interval": 0.05}
    )
    key, _ = key_service.create_key(db, name="k", credits=100)
    engine = BatchRecorder()
    worker = Worker(settings=settings, db=db, storage=LocalStorage(tmp_path / "img"), engine=engine)
    first = generation.submit(db, settings, key=key, request=request()).id
    thread = threading.Thread(target=worker.run_once)
    thread.start()
    try:
        while True:  # the first claim has happened once the task runs
            with db.read() as conn:
                if task_store.get_task(conn, first).state is not TaskState.QUEUED:
                    break
        other = generation.submit(db, settings, key=key, request=request(Size(768, 1344))).id
        more = [generation.submit(db, settings, key=key, request=request()).id for _ in range(2)]
        worker.wake.set()
    finally:
        thread.join(timeout=60)
    assert not thread.is_alive()
    if batch_timeout:
        assert engine.batches == [[first, *more]]
    else:
        assert engine.batches == [[first]]
    worker.settings = settings.model_copy(update={"batch_timeout": 0.0})  # nothing to wait for
    assert worker.run_once()
    assert engine.batches[-1] == [other]  # the oldest waiting task's batch comes next
    with db.read() as conn:
        assert task_store.get_task(conn, first).state is TaskState.COMPLETED


def test_files_of_a_completion_that_failed_are_deleted_once_the_database_answers(
    tmp_path: Path, settings: Settings, db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The images were stored, then the completing write failed (database down): the task is
    run again later with new files, so these would be left over for ever."""
    from cogview_api.errors import ServiceUnavailable

    key, _ = key_service.create_key(db, name="k", credits=8)
    task = generation.submit(db, settings, key=key, request=request(n=2))
    worker = Worker(
        settings=settings, db=db, storage=LocalStorage(tmp_path / "img"), engine=FlakyEngine()
    )

    def database_down(*args: object, **kwargs: object) -> bool:
        raise ServiceUnavailable("The database is unavailable; try again shortly.")

    with monkeypatch.context() as patch:
        patch.setattr(task_store, "complete_task", database_down)
        assert worker.run_once()
    assert len(list((tmp_path / "img").rglob("*.png"))) == 2  # stored, not recorded
    assert not worker.run_once()  # the next pass finds no image rows for them
    assert list((tmp_path / "img").rglob("*.png")) == []
    with db.read() as conn:
        assert task_store.get_task(conn, task.id).state is TaskState.FAILED


def test_a_batch_timeout_that_could_outlast_the_lease_is_refused() -> None:
    # Claimed tasks wait out batch_timeout before their lease is first renewed.
    with pytest.raises(ValueError, match="COGVIEW_BATCH_TIMEOUT"):
        Settings(lease_seconds=3.0, batch_timeout=1.0)
    assert Settings(lease_seconds=3.0, batch_timeout=0.9).batch_timeout == 0.9
