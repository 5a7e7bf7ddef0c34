"""The queue: claims, leases and the worker registry, all on the `tasks` table.

A claim takes up to B waiting tasks that share a batch key (width, height, steps, guidance),
those of the lowest priority class first (domain.PriorityClass: interactive before batch), within
a class the least-loaded API key's first, then oldest first, and marks them RUNNING under the
worker's id with a lease deadline, in one short write transaction (PostgreSQL: `FOR UPDATE
SKIP LOCKED`; SQLite: `BEGIN IMMEDIATE`).
A worker renews its lease while it works; a lease that runs out puts the task back in the
queue, and after `max_attempts` claims it fails with a refund. Every write a worker makes to
a task is fenced on (state RUNNING, worker_id = its own id), so a worker that lost its lease
cannot overwrite whoever took the task next.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, case, delete, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import BatchKey, Stage, TaskState
from cogview_api.store.notify import announce, announce_change
from cogview_api.store.tables import tasks, workers
from cogview_api.store.tasks import fail_task


def claim_batch(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    recent: Mapping[str, int] | None = None,
    batch_key: BatchKey | None = None,
) -> list[str]:
    """Claim up to `limit` waiting tasks of one batch key, fairly between API keys.

    Each API key's load is its RUNNING tasks (all workers) plus `recent`: how many of its tasks
    this worker's previous batch ran (a single worker would otherwise see every key at load 0
    after each batch and go back to the oldest task, the heavy key's). In the lowest priority
    class with tasks waiting, the key with the least load, then the oldest waiting task, picks
    the batch key; the batch then takes that batch key's waiting tasks by (their class, their
    key's load, seq): a later class's tasks only fill the room the earlier class leaves. With
    `batch_key`, only tasks of that key are taken (topping up a batch). Returns the ids in
    batch order.
    """
    load: dict[str, int] = dict(recent or {})
    running = conn.execute(
        select(tasks.c.key_id, func.count())
        .where(tasks.c.state == TaskState.RUNNING)
        .group_by(tasks.c.key_id)
    ).all()
    for key_id, count in running:
        load[key_id] = load.get(key_id, 0) + int(count)
    if batch_key is None:
        batch_key = _pick_batch_key(conn, load)
        if batch_key is None:
            return []
    order: list[Any] = [tasks.c.priority, tasks.c.seq]
    if load:  # within a class, lighter keys' tasks first
        order.insert(1, case(load, value=tasks.c.key_id, else_=0))
    ids = list(
        conn.execute(
            select(tasks.c.id)
            .where(
                tasks.c.state == TaskState.QUEUED,
                tasks.c.width == batch_key.width,
                tasks.c.height == batch_key.height,
                tasks.c.steps == batch_key.steps,
                tasks.c.guidance_scale == batch_key.guidance_scale,
            )
            .order_by(*order)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
    if not ids:
        return []
    now = utcnow()
    conn.execute(
        update(tasks)
        .where(tasks.c.id.in_(ids), tasks.c.state == TaskState.QUEUED)
        .values(
            state=TaskState.RUNNING,
            stage=Stage.ENCODING,
            step=0,
            worker_id=worker_id,
            attempts=tasks.c.attempts + 1,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
        )
    )
    announce_change(conn)  # the claimed tasks run, and those behind them move up
    return ids


def _pick_batch_key(conn: Connection, load: Mapping[str, int]) -> BatchKey | None:
    """The batch key of the oldest waiting task of the least-loaded API key that has one, in the
    lowest priority class with tasks waiting.

    Another worker's claim may hold that task's row (PostgreSQL, SKIP LOCKED): then the next
    key in order is tried.
    """
    heads = conn.execute(
        select(tasks.c.priority, tasks.c.key_id, func.min(tasks.c.seq))
        .where(tasks.c.state == TaskState.QUEUED)
        .group_by(tasks.c.priority, tasks.c.key_id)
    ).all()
    for priority, key_id, _ in sorted(heads, key=lambda h: (h[0], load.get(h[1], 0), h[2])):
        head = conn.execute(
            select(tasks.c.width, tasks.c.height, tasks.c.steps, tasks.c.guidance_scale)
            .where(
                tasks.c.state == TaskState.QUEUED,
                tasks.c.priority == priority,
                tasks.c.key_id == key_id,
            )
            .order_by(tasks.c.seq)
            .limit(1)
            .with_for_update(skip_locked=True)
        ).first()
        if head is not None:
            return BatchKey(head.width, head.height, head.steps, head.guidance_scale)
    return None


def renew_leases(
    conn: Connection, *, worker_id: str, task_ids: Sequence[str], lease_seconds: float
) -> set[str]:
    """Extend the leases this worker still holds; returns the ids it still owns."""
    if not task_ids:
        return set()
    deadline = utcnow() + timedelta(seconds=lease_seconds)
    owned = tasks.c.id.in_(task_ids), tasks.c.worker_id == worker_id
    conn.execute(
        update(tasks)
        .where(*owned, tasks.c.state == TaskState.RUNNING)
        .values(lease_expires_at=deadline)
    )
    held = select(tasks.c.id).where(*owned, tasks.c.state == TaskState.RUNNING)
    return set(conn.execute(held).scalars())


# A running task put back in the queue: by the lease reclaim, or handed back by its worker.
_BACK_IN_QUEUE: dict[str, Any] = {
    "state": TaskState.QUEUED,
    "stage": Stage.QUEUED,
    "step": 0,
    "worker_id": None,
    "lease_expires_at": None,
}


def reclaim_expired(conn: Connection, *, now: datetime | None = None) -> tuple[int, int]:
    """Put tasks with a lapsed lease back in the queue, or fail them after max_attempts.

    Returns (requeued, failed).
    """
    now = now or utcnow()
    rows = conn.execute(
        select(tasks.c.id, tasks.c.attempts, tasks.c.max_attempts, tasks.c.worker_id)
        .where(tasks.c.state == TaskState.RUNNING, tasks.c.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    requeued = failed = 0
    for row in rows:
        if row.attempts >= row.max_attempts:
            failed += fail_task(
                conn,
                task_id=row.id,
                worker_id=row.worker_id,
                error_code=500,
                error_type="server_error",
                message=(
                    f"The task was abandoned by its worker {row.attempts} times "
                    "(worker crashed or lost); credits refunded."
                ),
            )
        else:
            conn.execute(
                update(tasks)
                .where(tasks.c.id == row.id, tasks.c.state == TaskState.RUNNING)
                .values(**_BACK_IN_QUEUE)
            )
            requeued += 1
    if requeued:
        announce(conn)  # idle workers take them at once, on commit
        announce_change(conn)
    return requeued, failed


def release_worker_tasks(conn: Connection, *, worker_id: str) -> int:
    """Put a stopping worker's running tasks back in the queue as if never claimed (the attempt
    it made is not counted: the worker did not fail them, it was told to stop). Its completing
    or progress writes, fenced on RUNNING and its id, then match nothing. Returns how many."""
    released = conn.execute(
        update(tasks)
        .where(tasks.c.state == TaskState.RUNNING, tasks.c.worker_id == worker_id)
        .values(**_BACK_IN_QUEUE, started_at=None, attempts=tasks.c.attempts - 1)
    ).rowcount
    if released:
        announce(conn)  # another worker takes them at once, on commit (PostgreSQL)
        announce_change(conn)
    return int(released)


def register_worker(conn: Connection, *, worker_id: str, model: str, device: str) -> None:
    now = utcnow()
    conn.execute(delete(workers).where(workers.c.id == worker_id))
    conn.execute(
        insert(workers).values(
            id=worker_id, model=model, device=device, ready=True, started_at=now, heartbeat_at=now
        )
    )


def heartbeat_worker(conn: Connection, *, worker_id: str) -> bool:
    """False if the worker has no row (pruned while it could not write): it registers again."""
    updated = conn.execute(
        update(workers).where(workers.c.id == worker_id).values(heartbeat_at=utcnow())
    ).rowcount
    return bool(updated)


# More than a page of SQLite (4 KiB by default, 64 KiB at most): a row this long needs pages of
# its own.
_PROBE_ROW_BYTES = 70_000


def touch(conn: Connection) -> None:
    """A write that leaves nothing behind, to learn whether the database takes writes now.
    PostgreSQL refuses any write in a read-only transaction, so there a write that changes no
    row tells. SQLite runs such a write, and one that changes a row in place, on a database
    that cannot grow ("database or disk is full"): there a row longer than a page is inserted,
    which must be given new pages, under a savepoint that is then rolled back."""
    if conn.dialect.name != "sqlite":
        conn.execute(update(workers).where(workers.c.id == "").values(heartbeat_at=utcnow()))
        return
    now = utcnow()
    savepoint = conn.begin_nested()
    # Refused: SQLite has ended the whole transaction (the savepoint with it), so the error goes
    # up as it is and the caller's transaction rolls back.
    conn.execute(
        insert(workers).values(
            id="", model="x" * _PROBE_ROW_BYTES, device="", ready=False,
            started_at=now, heartbeat_at=now,
        )
    )  # fmt: skip
    savepoint.rollback()


def prune_workers(conn: Connection, *, stale_seconds: float) -> int:
    """Delete the rows of workers whose heartbeat is older than `stale_seconds`: killed without
    a goodbye (SIGKILL, a lost machine). A live worker beats every poll when idle and every
    third of a lease while a batch runs, so only a worker that stopped beats that long is
    gone; its tasks come back by their leases (`reclaim_expired`). Returns how many."""
    since = utcnow() - timedelta(seconds=stale_seconds)
    return int(conn.execute(delete(workers).where(workers.c.heartbeat_at < since)).rowcount)


def unregister_worker(conn: Connection, *, worker_id: str) -> None:
    conn.execute(delete(workers).where(workers.c.id == worker_id))


def ready_workers(conn: Connection, *, within_seconds: float) -> int:
    since = utcnow() - timedelta(seconds=within_seconds)
    rows = conn.execute(
        select(workers.c.id).where(workers.c.ready.is_(True), workers.c.heartbeat_at >= since)
    ).all()
    return len(rows)
