"""The queue: claims, leases and the worker registry, all on the `tasks` table.

A claim takes up to B waiting tasks that share a batch key (width, height, steps, guidance),
oldest first, and marks them RUNNING under the worker's id with a lease deadline, in one
short write transaction (PostgreSQL: `FOR UPDATE SKIP LOCKED`; SQLite: `BEGIN IMMEDIATE`).
A worker renews its lease while it works; a lease that runs out puts the task back in the
queue, and after `max_attempts` claims it fails with a refund. Every write a worker makes to
a task is fenced on (state RUNNING, worker_id = its own id), so a worker that lost its lease
cannot overwrite whoever took the task next.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, insert, select, update

from cogview_api.domain import Stage, TaskState
from cogview_api.store.tables import tasks, utcnow, workers
from cogview_api.store.tasks import fail_task


def claim_batch(conn: Connection, *, worker_id: str, limit: int, lease_seconds: float) -> list[str]:
    """Claim up to `limit` waiting tasks of one batch key; returns their ids, oldest first."""
    first = conn.execute(
        select(tasks.c.width, tasks.c.height, tasks.c.steps, tasks.c.guidance_scale)
        .where(tasks.c.state == TaskState.QUEUED)
        .order_by(tasks.c.seq)
        .limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if first is None:
        return []
    ids = list(
        conn.execute(
            select(tasks.c.id)
            .where(
                tasks.c.state == TaskState.QUEUED,
                tasks.c.width == first.width,
                tasks.c.height == first.height,
                tasks.c.steps == first.steps,
                tasks.c.guidance_scale == first.guidance_scale,
            )
            .order_by(tasks.c.seq)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).scalars()
    )
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
    return ids


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
                .values(
                    state=TaskState.QUEUED,
                    stage=Stage.QUEUED,
                    step=0,
                    worker_id=None,
                    lease_expires_at=None,
                )
            )
            requeued += 1
    return requeued, failed


def register_worker(conn: Connection, *, worker_id: str, model: str, device: str) -> None:
    now = utcnow()
    conn.execute(delete(workers).where(workers.c.id == worker_id))
    conn.execute(
        insert(workers).values(
            id=worker_id, model=model, device=device, ready=True, started_at=now, heartbeat_at=now
        )
    )


def heartbeat_worker(conn: Connection, *, worker_id: str) -> None:
    conn.execute(update(workers).where(workers.c.id == worker_id).values(heartbeat_at=utcnow()))


def unregister_worker(conn: Connection, *, worker_id: str) -> None:
    conn.execute(delete(workers).where(workers.c.id == worker_id))


def ready_workers(conn: Connection, *, within_seconds: float) -> int:
    since = utcnow() - timedelta(seconds=within_seconds)
    rows = conn.execute(
        select(workers.c.id).where(workers.c.ready.is_(True), workers.c.heartbeat_at >= since)
    ).all()
    return len(rows)
