"""Batch records: a batch and its tasks written at once, read back with counts, listed, paged,
cancelled. A batch's tasks are ordinary `tasks` rows (queue items like any other) carrying its
id and their line's index; how a batch ends is store/batch_ends.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import (
    CANCELLED_CODE,
    CANCELLED_TYPE,
    Batch,
    BatchStatus,
    GenerationRequest,
    PriorityClass,
    Task,
    TaskState,
    new_task_id,
)
from cogview_api.errors import Conflict, NotFound
from cogview_api.store import tasks as task_store
from cogview_api.store.batch_ends import batch_task_ended
from cogview_api.store.keys import move_credits_per_task
from cogview_api.store.notify import announce, announce_change
from cogview_api.store.tables import api_keys, batches, images, tasks
from cogview_api.store.webhooks import enqueue_delivery

# Rows per executemany: large enough that a 10,000-line batch is 20 statements, small enough
# that one statement's parameters stay well inside every driver's limits.
INSERT_CHUNK = 500
_LIVE = (TaskState.QUEUED.value, TaskState.RUNNING.value)


@dataclass(frozen=True)
class NewTask:
    """One line of a batch, priced and shaped by the settings."""

    request: GenerationRequest
    steps: int
    price: int


def insert_batch(
    conn: Connection,
    *,
    batch_id: str,
    key_id: str,
    lines: Sequence[NewTask],
    guidance_scale: float,
    max_attempts: int,
    callback_url: str | None,
    metadata: Mapping[str, str] | None,
    base_url: str | None,
    request_id: str | None,
) -> Batch:
    """Reserve the whole batch's credits, write the batch and its tasks, in the caller's one
    transaction: one balance update, and the ledger rows and the tasks by one executemany per
    chunk. Raises InsufficientCredits (the batch's cost and the balance) with nothing written.
    Its tasks are of the BATCH class: every waiting interactive task is claimed before them."""
    now = utcnow()
    ids = [new_task_id() for _ in lines]
    move_credits_per_task(
        conn,
        key_id=key_id,
        kind="reserve",
        amounts=[(task_id, -line.price) for task_id, line in zip(ids, lines, strict=True)],
        what=f"this batch of {len(lines)} requests",
    )
    conn.execute(
        insert(batches).values(
            id=batch_id,
            key_id=key_id,
            status=BatchStatus.IN_PROGRESS,
            total=len(lines),
            images_total=sum(line.request.n for line in lines),
            live=len(lines),
            callback_url=callback_url,
            base_url=base_url,
            user_metadata=dict(metadata) if metadata is not None else None,
            created_at=now,
            finished_at=None,
        )
    )
    rows = (
        {
            **task_store.task_values(
                task_id=task_id,
                key_id=key_id,
                request=line.request,
                steps=line.steps,
                guidance_scale=guidance_scale,
                price=line.price,
                max_attempts=max_attempts,
                base_url=base_url,
                surface="native",
                request_id=request_id,
                now=now,
                priority=PriorityClass.BATCH,
            ),
            "batch_id": batch_id,
            "batch_index": index,
        }
        for index, (task_id, line) in enumerate(zip(ids, lines, strict=True))
    )
    for chunk in _chunks(rows, INSERT_CHUNK):
        conn.execute(insert(tasks), chunk)
    announce(conn)  # wakes listening workers when this transaction commits (PostgreSQL)
    return get_batch(conn, batch_id)


def _chunks(rows: Iterator[dict[str, Any]] | Any, size: int) -> Iterator[list[dict[str, Any]]]:
    chunk: list[dict[str, Any]] = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


_COUNTS = select(
    tasks.c.state,
    func.count(),
    func.coalesce(func.sum(tasks.c.n), 0),
    func.coalesce(func.sum(tasks.c.credits_charged), 0),
    func.coalesce(func.sum(tasks.c.credits_refunded), 0),
).group_by(tasks.c.state)


def get_batch(conn: Connection, batch_id: str, *, key_id: str | None = None) -> Batch:
    """The batch with its tasks counted by state; with `key_id`, another key's is NotFound."""
    query = select(batches).where(batches.c.id == batch_id)
    if key_id is not None:
        query = query.where(batches.c.key_id == key_id)
    row = conn.execute(query).first()
    if row is None:
        raise NotFound(f"No batch with id {batch_id!r}.")
    return _counted(conn, row._mapping)


def _counted(conn: Connection, m: Any) -> Batch:
    counts = dict.fromkeys(TaskState, 0)
    images_done = charged = refunded = 0
    for state, count, n, charge, refund in conn.execute(_COUNTS.where(tasks.c.batch_id == m["id"])):
        counts[TaskState(state)] = int(count)
        if state == TaskState.COMPLETED:
            images_done = int(n)
        charged += int(charge)
        refunded += int(refund)
    return Batch(
        id=m["id"],
        seq=m["seq"],
        key_id=m["key_id"],
        status=BatchStatus(m["status"]),
        total=m["total"],
        images_total=m["images_total"],
        counts=counts,
        images_done=images_done,
        credits_charged=charged,
        credits_refunded=refunded,
        created_at=m["created_at"],
        finished_at=m["finished_at"],
        callback_url=m["callback_url"],
        metadata=m["user_metadata"],
        base_url=m["base_url"],
    )


def batch_versions(conn: Connection, batch_ids: Sequence[str]) -> dict[str, BatchVersion]:
    """Per batch what its public object changes with (its status and its tasks counted by
    state: equal while nothing changed) and whether its key was revoked, by two statements
    for all; a batch that does not exist is left out."""
    if not batch_ids:
        return {}
    heads = conn.execute(
        select(batches.c.id, batches.c.status, api_keys.c.revoked_at)
        .select_from(batches.join(api_keys, api_keys.c.id == batches.c.key_id))
        .where(batches.c.id.in_(list(batch_ids)))
    ).all()
    counts: dict[str, list[tuple[str, int]]] = {}
    for r in conn.execute(
        select(tasks.c.batch_id, tasks.c.state, func.count())
        .where(tasks.c.batch_id.in_([h.id for h in heads]))
        .group_by(tasks.c.batch_id, tasks.c.state)
    ):
        counts.setdefault(r[0], []).append((str(r[1]), int(r[2])))
    return {
        h.id: BatchVersion(
            version=(h.status, *sorted(counts.get(h.id, ()))),
            revoked=h.revoked_at is not None,
        )
        for h in heads
    }


@dataclass(frozen=True)
class BatchVersion:
    version: tuple[Any, ...]
    revoked: bool


def list_batches(
    conn: Connection, *, key_id: str, limit: int, before_seq: int | None = None
) -> list[Batch]:
    """The key's batches, newest first, strictly older than `before_seq` when given."""
    query = select(batches).where(batches.c.key_id == key_id)
    if before_seq is not None:
        query = query.where(batches.c.seq < before_seq)
    rows = conn.execute(query.order_by(batches.c.seq.desc()).limit(limit)).all()
    return [_counted(conn, r._mapping) for r in rows]


def batch_tasks(
    conn: Connection,
    *,
    batch_id: str,
    limit: int,
    after_index: int | None = None,
    states: Sequence[TaskState] | None = None,
    batch_size: int = 1,
) -> list[Task]:
    """The batch's tasks in line order, after `after_index` when given, as `list_tasks` gives
    them (images, webhooks, queue positions)."""
    query = select(tasks).where(tasks.c.batch_id == batch_id)
    if after_index is not None:
        query = query.where(tasks.c.batch_index > after_index)
    if states:
        query = query.where(tasks.c.state.in_([s.value for s in states]))
    rows = conn.execute(query.order_by(tasks.c.batch_index).limit(limit)).all()
    return task_store.tasks_in_full(conn, rows, batch_size)


@dataclass(frozen=True)
class ArchiveEntry:
    """One task of a batch as its archive lists it: its line, and its stored images."""

    index: int
    task_id: str
    state: TaskState
    prompt: str
    width: int
    height: int
    seeds: tuple[int, ...]
    seed_given: bool
    error: dict[str, Any] | None
    images: tuple[tuple[int, str, str], ...]  # (image index, format, storage key)


def archive_entries(
    conn: Connection, *, batch_id: str, after_index: int, limit: int
) -> list[ArchiveEntry]:
    """A page of the batch's tasks in line order with what the archive needs of each: the
    images of a completed task that are still kept (not yet expired and deleted)."""
    rows = conn.execute(
        select(
            tasks.c.id,
            tasks.c.batch_index,
            tasks.c.state,
            tasks.c.prompt,
            tasks.c.width,
            tasks.c.height,
            tasks.c.seeds,
            tasks.c.seed_given,
            tasks.c.error_code,
            tasks.c.error_type,
            tasks.c.error_message,
        )
        .where(tasks.c.batch_id == batch_id, tasks.c.batch_index > after_index)
        .order_by(tasks.c.batch_index)
        .limit(limit)
    ).all()
    done = [r.id for r in rows if r.state == TaskState.COMPLETED]
    stored: dict[str, list[tuple[int, str, str]]] = {}
    if done:
        for img in conn.execute(
            select(images.c.task_id, images.c.idx, images.c.format, images.c.storage_key)
            .where(images.c.task_id.in_(done), images.c.deleted_at.is_(None))
            .order_by(images.c.task_id, images.c.idx)
        ):
            stored.setdefault(img.task_id, []).append((img.idx, img.format, img.storage_key))
    return [
        ArchiveEntry(
            index=r.batch_index,
            task_id=r.id,
            state=TaskState(r.state),
            prompt=r.prompt,
            width=r.width,
            height=r.height,
            seeds=tuple(int(s) for s in r.seeds),
            seed_given=bool(r.seed_given),
            error=None
            if r.error_code is None
            else {"code": r.error_code, "type": r.error_type, "message": r.error_message},
            images=tuple(stored.get(r.id, ())),
        )
        for r in rows
    ]


def cancel_batch(conn: Connection, *, batch_id: str, key_id: str, message: str) -> Batch:
    """Cancel every task of the batch not yet ended, with a refund, and end the batch
    CANCELLED, in the caller's one transaction; returns it. Conflict if it has ended already.

    The tasks first, then the batch row (the order in which a task's own end takes its locks,
    store/batch_ends.py, so the two never deadlock): one UPDATE for all of them, one balance
    update and one ledger row per task for the refunds. A running task's worker finds out at
    its next step (its progress write, fenced on RUNNING, matches no row) and stores nothing.
    """
    batch = get_batch(conn, batch_id, key_id=key_id)
    if batch.status is not BatchStatus.IN_PROGRESS:
        raise Conflict(
            f"The batch is already {batch.status.wire_status}; only a batch in progress can "
            "be cancelled."
        )
    now = utcnow()
    ended = conn.execute(
        update(tasks)
        .where(tasks.c.batch_id == batch_id, tasks.c.state.in_(_LIVE))
        .values(
            state=TaskState.CANCELLED,
            credits_refunded=tasks.c.credits_charged,
            error_code=CANCELLED_CODE,
            error_type=CANCELLED_TYPE,
            error_message=message,
            completed_at=now,
            lease_expires_at=None,
        )
        .returning(tasks.c.id, tasks.c.credits_charged, tasks.c.callback_url)
    ).all()
    move_credits_per_task(
        conn,
        key_id=key_id,
        kind="refund",
        amounts=[(r.id, int(r.credits_charged)) for r in ended],
        what="this refund",
    )
    for r in ended:
        if r.callback_url is not None:
            enqueue_delivery(conn, task_id=r.id)
    if not batch_task_ended(conn, batch_id, ended=len(ended), status=BatchStatus.CANCELLED):
        # Its last task ended meanwhile (PostgreSQL reads committed rows): it completed.
        raise Conflict("The batch has already ended; only a batch in progress can be cancelled.")
    announce_change(conn)
    return get_batch(conn, batch_id)
