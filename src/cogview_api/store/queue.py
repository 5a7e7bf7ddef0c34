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

from sqlalchemy import Connection, and_, case, delete, func, insert, literal, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import BatchKey, Stage, Task, TaskState
from cogview_api.store.notify import announce, announce_change
from cogview_api.store.tables import tasks, workers
from cogview_api.store.tasks import fail_task, task_of_row


def claim_batch(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    recent: Mapping[str, int] | None = None,
    batch_key: BatchKey | None = None,
) -> list[str]:
    """The ids of `claim_tasks`, in batch order."""
    claimed = claim_tasks(
        conn,
        worker_id=worker_id,
        limit=limit,
        lease_seconds=lease_seconds,
        recent=recent,
        batch_key=batch_key,
    )
    return [t.id for t in claimed]


def claim_tasks(
    conn: Connection,
    *,
    worker_id: str,
    limit: int,
    lease_seconds: float,
    recent: Mapping[str, int] | None = None,
    batch_key: BatchKey | None = None,
) -> list[Task]:
    """Claim up to `limit` waiting tasks of one batch key, fairly between API keys, in one
    statement (`UPDATE ... RETURNING` the claimed rows, as they are after the claim).

    Each API key's load is its RUNNING tasks (all workers) plus `recent`: how many of its tasks
    this worker's previous batch ran (a single worker would otherwise see every key at load 0
    after each batch and go back to the oldest task, the heavy key's). The first waiting task
    by (priority class, its key's load, seq), the lowest class's least-loaded key's oldest, picks
    the batch key; the batch then takes that batch key's waiting tasks by (their class, their
    key's load, seq): a later class's tasks only fill the room the earlier class leaves. With
    `batch_key`, only tasks of that key are taken (topping up a batch). Returns the tasks in
    batch order.

    On PostgreSQL both picks lock with `FOR UPDATE SKIP LOCKED`, so concurrent claims take
    disjoint tasks without waiting on each other (a head another claim holds is passed over for
    the next task in order); on SQLite the caller's write transaction (`BEGIN IMMEDIATE`) holds
    the one writer lock for this one statement.
    """
    load = (
        select(tasks.c.key_id, func.count().label("n"))
        .where(tasks.c.state == TaskState.RUNNING)
        .group_by(tasks.c.key_id)
        .cte("load")
    )
    weight: Any = func.coalesce(load.c.n, 0)
    if recent:
        weight = weight + case(dict(recent), value=tasks.c.key_id, else_=0)
    queued = tasks.outerjoin(load, load.c.key_id == tasks.c.key_id)
    if batch_key is None:
        head = _head(queued, weight).cte("head")
        same_shape = [col == head.c[col.name] for col in _SHAPE]
        source = queued.join(head, and_(*same_shape))
    else:
        source = queued
        same_shape = [
            col == value for col, value in zip(_SHAPE, _shape_values(batch_key), strict=True)
        ]
    batch = (
        select(tasks.c.id, weight.label("weight"))
        .select_from(source)
        .where(tasks.c.state == TaskState.QUEUED, *same_shape)
        .order_by(tasks.c.priority, weight, tasks.c.seq)
        .limit(limit)
        .with_for_update(of=tasks, skip_locked=True)
    )
    now = utcnow()
    running = update(tasks).values(
        state=TaskState.RUNNING,
        stage=Stage.ENCODING,
        step=0,
        worker_id=worker_id,
        attempts=tasks.c.attempts + 1,
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        started_at=now,
    )
    if conn.dialect.name == "postgresql":
        taken = batch.cte("batch")
        rows = conn.execute(
            running.where(tasks.c.id == taken.c.id).returning(*tasks.c, taken.c.weight)
        ).all()
        weights = {r.id: r.weight for r in rows}
    else:
        # SQLite's RETURNING cannot name an UPDATE's FROM table: the picks are read first, in
        # the same write transaction (the one writer lock is held from its BEGIN IMMEDIATE).
        weights = {r.id: r.weight for r in conn.execute(batch)}
        rows = conn.execute(running.where(tasks.c.id.in_(list(weights))).returning(*tasks.c)).all()
    if not rows:
        return []
    announce_change(conn)  # the claimed tasks run, and those behind them move up
    ordered = sorted(rows, key=lambda r: (r.priority, weights[r.id], r.seq))
    return [task_of_row(r._mapping) for r in ordered]


def _head(source: Any, weight: Any) -> Any:
    """The batch key of the first waiting task by (class, its key's `weight`, seq), locked."""
    return (
        select(*_SHAPE)
        .select_from(source)
        .where(tasks.c.state == TaskState.QUEUED)
        .order_by(tasks.c.priority, weight, tasks.c.seq)
        .limit(1)
        .with_for_update(of=tasks, skip_locked=True)
    )


def _pick_batch_key(conn: Connection, load: Mapping[str, int]) -> BatchKey | None:
    """The batch key a claim would pick with these loads (every key not named: 0)."""
    weight = case(dict(load), value=tasks.c.key_id, else_=0) if load else literal(0)
    row = conn.execute(_head(tasks, weight)).first()
    return None if row is None else BatchKey(*row)


_SHAPE = (tasks.c.width, tasks.c.height, tasks.c.steps, tasks.c.guidance_scale)


def _shape_values(key: BatchKey) -> tuple[int, int, int, float]:
    return (key.width, key.height, key.steps, key.guidance_scale)


# The advisory lock of the shared housekeeping (PostgreSQL): one process at a time reclaims
# leases, prunes workers and deletes expired images. Any fixed 64-bit number.
HOUSEKEEPING_LOCK = 0x636F_6776_6965_7701


def take_housekeeping_lock(conn: Connection) -> bool:
    """Whether this transaction may do the shared housekeeping: on PostgreSQL a transaction
    advisory lock, False at once while another process holds it (it is released at commit);
    SQLite's write transaction already holds the one writer lock: True."""
    if conn.dialect.name != "postgresql":
        return True
    return bool(
        conn.execute(select(func.pg_try_advisory_xact_lock(HOUSEKEEPING_LOCK))).scalar_one()
    )


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
