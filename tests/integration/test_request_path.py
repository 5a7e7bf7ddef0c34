"""The counters the request path reads instead of counting (migration 0004), on each backend:
the waiting-task stripes, a task's queue position from either end of the queue, and the key's
account totals stay equal to what counting the rows gives, through every move of a task; a
submit answers with the task as a fresh read gives it."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from sqlalchemy import Connection, func, select, update

from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, ImageRecord, Size, TaskState
from cogview_api.errors import AuthenticationFailed, NotFound, PermissionDenied, ServiceUnavailable
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.tables import tasks


def _request(prompt: str = "a red fox") -> GenerationRequest:
    return GenerationRequest(
        model="cogview-4", prompt=prompt, size=Size(1024, 1024), quality="hd", n=1
    )


def _counted(db: Database) -> tuple[int, int]:
    """(the counter's waiting tasks, a COUNT of them)."""
    with db.read() as conn:
        counted = conn.execute(
            select(func.count()).select_from(tasks).where(tasks.c.state == TaskState.QUEUED)
        ).scalar_one()
        return task_store.waiting_tasks(conn), int(counted)


def _submit(db: Database, settings: Settings, key: ApiKey, count: int) -> list[str]:
    return [
        generation.submit(db, settings, key=key, request=_request(f"fox {i}")).id
        for i in range(count)
    ]


def test_waiting_counter_follows_every_move_of_a_task(db: Database, settings: Settings) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    ids = _submit(db, settings, key, 6)
    assert _counted(db) == (6, 6)
    with db.write() as conn:
        claimed = queue.claim_batch(conn, worker_id="w1", limit=2, lease_seconds=60)
    assert len(claimed) == 2
    assert _counted(db) == (4, 4)
    generation.cancel(db, key=key, task_id=ids[5])  # a waiting task leaves the queue
    generation.cancel(db, key=key, task_id=claimed[0])  # a running one: the queue unchanged
    assert _counted(db) == (3, 3)
    with db.write() as conn:  # a lapsed lease puts the task back, as the reclaim does
        conn.execute(update(tasks).where(tasks.c.id == claimed[1]).values(state=TaskState.QUEUED))
    assert _counted(db) == (4, 4)


def test_queue_position_is_the_same_counted_from_either_end(
    db: Database, settings: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    ids = _submit(db, settings, key, 7)
    with db.read() as conn:
        positions = [task_store.get_task(conn, i).queue_position for i in ids]
    assert positions == [1, 2, 3, 4, 5, 6, 7]
    with db.write() as conn:
        queue.claim_batch(conn, worker_id="w1", limit=2, lease_seconds=60)
    generation.cancel(db, key=key, task_id=ids[4])
    with db.read() as conn:
        positions = [task_store.get_task(conn, i).queue_position for i in ids]
    assert positions == [None, None, 1, 2, None, 3, 4]


def test_a_submit_answers_with_the_task_a_fresh_read_gives(
    db: Database, settings: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    _submit(db, settings, key, 2)
    answered = generation.submit(db, settings, key=key, request=_request("an owl"))
    with db.read() as conn:
        read = task_store.get_task(conn, answered.id)
    assert answered == read
    assert answered.queue_position == 3


def test_account_totals_equal_the_ledger_and_the_images(db: Database, settings: Settings) -> None:
    key, secret = key_service.create_key(db, name="k", credits=100)
    ids = _submit(db, settings, key, 3)
    generation.cancel(db, key=key, task_id=ids[2])  # charged, then refunded
    with db.write() as conn:
        (running, *_) = queue.claim_batch(conn, worker_id="w1", limit=1, lease_seconds=60)
        image = ImageRecord(
            token="tok-" + running,
            index=0,
            width=1024,
            height=1024,
            seed=7,
            format="png",
            storage_key=f"{running}/0.png",
        )
        assert task_store.complete_task(
            conn, task_id=running, worker_id="w1", records=[image], retention=timedelta(days=1)
        )
    account = key_service.account_for(db, secret)
    with db.read() as conn:
        generated, spent = key_store.account_totals(conn, key.id)
    assert (account.images_generated, account.credits_spent) == (generated, spent)
    assert generated == 1
    assert spent == 2 * settings.price_for(_request().quality)


def test_a_full_queue_refuses_and_writes_nothing(db: Database, settings: Settings) -> None:
    key, secret = key_service.create_key(db, name="k", credits=100)
    small = settings.model_copy(update={"max_queue": 2})
    _submit(db, small, key, 2)
    before = key_service.account_for(db, secret)
    with pytest.raises(ServiceUnavailable):
        generation.submit(db, small, key=key, request=_request())
    after = key_service.account_for(db, secret)
    assert after.key.balance == before.key.balance
    assert _counted(db) == (2, 2)


def test_two_claims_taking_tasks_in_opposite_orders_both_commit(
    db: Database, settings: Settings
) -> None:
    """Two transactions each move two tasks out of the queue, in the opposite order of the
    tasks' seq % 16 stripes: transaction 1 moves a task of stripe 1, then one of stripe 2;
    transaction 2 one of stripe 2, then one of stripe 1. With 0004's stripes by seq PostgreSQL
    aborted one of them ("deadlock detected"); with a stripe per connection both commit, and
    the counter is exact after."""
    key, _ = key_service.create_key(db, name="k", credits=100)
    ids = _submit(db, settings, key, 18)
    with db.read() as conn:
        seq = dict(conn.execute(select(tasks.c.id, tasks.c.seq).where(tasks.c.id.in_(ids))).all())
    by_stripe: dict[int, list[str]] = {}
    for task_id in ids:
        by_stripe.setdefault(seq[task_id] % 16, []).append(task_id)
    (a, d), (b, c) = by_stripe[seq[ids[0]] % 16], by_stripe[seq[ids[1]] % 16]

    def claim(conn: Connection, task_id: str) -> None:
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(state=TaskState.RUNNING))

    second_moved_b, first_moves_c = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def second() -> None:
        try:
            with db.write() as conn:
                claim(conn, b)
                second_moved_b.set()
                first_moves_c.wait(10)
                claim(conn, d)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            second_moved_b.set()

    thread = threading.Thread(target=second)
    try:
        with db.write() as conn:
            claim(conn, a)
            thread.start()
            # On a shared stripe (both connections' pids equal mod 16) the second transaction
            # waits for this one's commit instead: no deadlock either, nothing to wait for here.
            second_moved_b.wait(2)
            first_moves_c.set()
            claim(conn, c)
    finally:
        first_moves_c.set()
        thread.join(30)
    assert errors == []
    assert _counted(db) == (14, 14)


def test_a_poll_checks_its_key_in_the_statement_that_reads_the_task(
    db: Database, settings: Settings
) -> None:
    """The poll's one statement (key by secret, task beside it) answers as the two reads did:
    the task for its own key; 404 for another key's task or an unknown id; 401 for an unknown
    secret; 403 once the key is revoked, from the next poll on."""
    key, secret = key_service.create_key(db, name="k", credits=100)
    _, other = key_service.create_key(db, name="other", credits=100)
    (task_id,) = _submit(db, settings, key, 1)
    with db.read() as conn:
        assert generation.get_task_for(db, secret=secret, task_id=task_id) == (
            task_store.get_task(conn, task_id)
        )
    for who, which in ((other, task_id), (secret, "no-such-task")):
        with pytest.raises(NotFound):
            generation.get_task_for(db, secret=who, task_id=which)
    with pytest.raises(AuthenticationFailed):
        generation.get_task_for(db, secret=secret + "x", task_id=task_id)
    key_service.revoke_key(db, key.id)
    with pytest.raises(PermissionDenied):
        generation.get_task_for(db, secret=secret, task_id=task_id)
