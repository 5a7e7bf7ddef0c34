"""Task records: insert with a credit reservation, read, list, and the terminal transitions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import (
    CANCELLED_CODE,
    CANCELLED_TYPE,
    ApiKey,
    BatchKey,
    GenerationRequest,
    ImageRecord,
    PriorityClass,
    Stage,
    Task,
    TaskState,
    image_seeds,
    new_task_id,
)
from cogview_api.errors import LimitState, NotFound, RateLimited, ServiceUnavailable
from cogview_api.store import positions
from cogview_api.store import previews as preview_store
from cogview_api.store.batch_ends import batch_task_ended
from cogview_api.store.keys import add_credits, hash_key, key_from
from cogview_api.store.notify import announce, announce_change
from cogview_api.store.tables import api_keys, images, previews, queue_depth, tasks
from cogview_api.store.webhooks import deliveries_of, enqueue_delivery

# The hot statements, built once: each request binds its values to them. Building a statement
# and its cache key costs more than executing it on SQLite (the profile).
_TASK = select(tasks).where(tasks.c.id == bindparam("task_id"))
_OWN_TASK = _TASK.where(tasks.c.key_id == bindparam("key_id"))
# A poll in one statement: the key of a bearer secret's hash and, beside it, its task of that
# id (NULLs when the key has no such task); the key's columns are labelled `key_...`.
_KEY_AND_OWN_TASK = (
    select(*(c.label("key_" + c.name) for c in api_keys.c), tasks)
    .select_from(
        api_keys.outerjoin(
            tasks, and_(tasks.c.id == bindparam("task_id"), tasks.c.key_id == api_keys.c.id)
        )
    )
    .where(api_keys.c.key_hash == bindparam("key_hash"))
)
_TASK_IMAGES = select(images).where(images.c.task_id == bindparam("task_id")).order_by(images.c.idx)
_INSERT_TASK = insert(tasks)
_WAITING = select(func.coalesce(func.sum(queue_depth.c.waiting), 0))
_queued = tasks.c.state == TaskState.QUEUED
# The limits on waiting tasks (COGVIEW_MAX_WAITING_PER_KEY, COGVIEW_MAX_QUEUE) are on interactive
# tasks: a batch's tasks (class BATCH, bounded by the batch's own size and paid for up front)
# neither count against them nor make a key's or another key's submits wait or be refused.
_interactive = and_(_queued, tasks.c.priority == PriorityClass.INTERACTIVE)
# A key's waiting interactive tasks, counted up to the limit (index
# ix_tasks_state_priority_key_seq: at most that many rows, however many the key has), how many
# keys have any, and how many wait in all, counted up to the queue's size.
_KEY_WAITING = select(func.count()).select_from(
    select(tasks.c.id)
    .where(tasks.c.key_id == bindparam("key_id"), _interactive)
    .limit(bindparam("limit"))
    .subquery()
)
_KEYS_WAITING = select(func.count(func.distinct(tasks.c.key_id))).where(_interactive)
_INTERACTIVE_WAITING = select(func.count()).select_from(
    select(tasks.c.id).where(_interactive).limit(bindparam("limit")).subquery()
)


def _share(conn: Connection, max_queue: int, own: int) -> int:
    """An equal share of the queue among the keys with tasks waiting, this one included. Counted
    only when the queue is full (it reads every waiting task's key)."""
    keys = int(conn.execute(_KEYS_WAITING).scalar_one()) + (0 if own else 1)
    return max(1, max_queue // max(1, keys))


def _interactive_waiting(conn: Connection, most: int) -> int:
    """How many interactive tasks wait, counted up to `most` (an index range)."""
    return int(conn.execute(_INTERACTIVE_WAITING, {"limit": most}).scalar_one())


def waiting_tasks(conn: Connection) -> int:
    """How many tasks wait in the queue: 16 counter rows (store/tables.py `queue_depth`)."""
    return int(conn.execute(_WAITING).scalar_one())


WAITING = "waiting"  # the waiting-tasks limit's name in the RateLimit headers


def waiting_state(limit: int, waiting: int) -> LimitState:
    """The waiting-tasks limit of a key with `waiting` tasks waiting: a quota of tasks, not of
    time (no window; it comes back as tasks start)."""
    return LimitState(
        name=WAITING, quota=limit, window=None, remaining=max(0, limit - waiting), reset=None
    )


_RUNNING = select(func.count()).select_from(tasks).where(tasks.c.state == TaskState.RUNNING)


def running_tasks(conn: Connection) -> int:
    """How many tasks a worker holds now (an index range: ix_tasks_state_seq)."""
    return int(conn.execute(_RUNNING).scalar_one())


# The task watcher's look (services/watch.py), one statement however many streams are open:
# per watched task what its public object changes with and whether its key was revoked, and
# beside them where the queue stands: its head, its length, its tail, and how many waiting tasks
# came after the tail the watcher saw last (so appends, which move no waiting task's place, can
# be told from removals and returns, which do). Each of these reads an end of an index.
_WATCH = (
    select(
        tasks.c.id,
        tasks.c.state,
        tasks.c.stage,
        tasks.c.step,
        tasks.c.attempts,
        tasks.c.previews_made,
        api_keys.c.revoked_at,
        select(func.min(tasks.c.seq)).where(_queued).scalar_subquery().label("queue_head"),
        select(func.max(tasks.c.seq)).where(_queued).scalar_subquery().label("queue_tail"),
        _WAITING.scalar_subquery().label("queue_length"),
        select(func.count())
        .select_from(tasks)
        .where(_queued, tasks.c.seq > bindparam("tail"))
        .scalar_subquery()
        .label("appended"),
    )
    .select_from(tasks.join(api_keys, api_keys.c.id == tasks.c.key_id))
    .where(tasks.c.id.in_(bindparam("ids", expanding=True)))
)


@dataclass(frozen=True)
class QueueMark:
    """Where the queue stood at a look."""

    head: int | None
    tail: int | None
    length: int

    def moved_since(self, before: QueueMark | None, appended: int) -> bool:
        """Whether a waiting task's place may have changed since `before`: the head left, or
        the length changed by more than the tasks appended after `before`'s tail."""
        if before is None:
            return True
        return self.head != before.head or self.length - appended != before.length


@dataclass(frozen=True)
class WatchLook:
    """What the watcher saw: per task a version (equal while its public object is unchanged,
    but for its queue position) and whether its key was revoked; and whether the queue moved."""

    versions: dict[str, tuple[Any, ...]]
    revoked: frozenset[str]
    queue: QueueMark | None
    queue_moved: bool


def watch_look(conn: Connection, task_ids: Sequence[str], before: QueueMark | None) -> WatchLook:
    """One statement for all `task_ids`; a task that no longer exists is left out."""
    tail = before.tail if before is not None and before.tail is not None else 0
    rows = conn.execute(_WATCH, {"ids": list(task_ids), "tail": tail}).all()
    if not rows:
        return WatchLook(versions={}, revoked=frozenset(), queue=before, queue_moved=False)
    r0 = rows[0]
    mark = QueueMark(head=r0.queue_head, tail=r0.queue_tail, length=int(r0.queue_length))
    return WatchLook(
        versions={r.id: (r.state, r.stage, r.step, r.attempts, r.previews_made) for r in rows},
        revoked=frozenset(r.id for r in rows if r.revoked_at is not None),
        queue=mark,
        queue_moved=mark.moved_since(before, int(r0.appended)),
    )


def insert_task(
    conn: Connection,
    *,
    key_id: str,
    request: GenerationRequest,
    steps: int,
    guidance_scale: float,
    price: int,
    max_attempts: int,
    max_queue: int,
    max_waiting_per_key: int | None = None,
    base_url: str | None = None,
    batch_size: int = 1,
    surface: str = "native",
    request_id: str | None = None,
) -> tuple[Task, int]:
    """Reserve `price` credits and enqueue the task, in the caller's one transaction. Returns
    the task as written (not read back), with its queue position, and how many of the key's
    tasks wait with this one (counted up to `max_waiting_per_key`; 0 without it).

    Raises InsufficientCredits, RateLimited (the key has `max_waiting_per_key` waiting) or
    ServiceUnavailable (the queue holds `max_queue` and this key has its equal share of it, so
    one key's flood never shuts out a key with little waiting); either way the caller's
    transaction rolls back and nothing is written.
    """
    own = 0
    if max_waiting_per_key is not None:
        own = int(
            conn.execute(
                _KEY_WAITING, {"key_id": key_id, "limit": max_waiting_per_key}
            ).scalar_one()
        )
        if own >= max_waiting_per_key:
            raise RateLimited(
                f"This key has {own} tasks waiting, its most; submit again once one has started.",
                retry_after=5,
                limits=(waiting_state(max_waiting_per_key, own),),
            )
    waiting = waiting_tasks(conn)
    # The counter holds every class; only when it says full are the interactive ones counted.
    full = waiting >= max_queue and _interactive_waiting(conn, max_queue) >= max_queue
    if full and (max_waiting_per_key is None or own >= _share(conn, max_queue, own)):
        raise ServiceUnavailable("The queue is full; try again shortly.", retry_after=10)
    task_id = new_task_id()
    add_credits(conn, key_id=key_id, amount=-price, kind="reserve", task_id=task_id)
    values = task_values(
        task_id=task_id,
        key_id=key_id,
        request=request,
        steps=steps,
        guidance_scale=guidance_scale,
        price=price,
        max_attempts=max_attempts,
        base_url=base_url,
        surface=surface,
        request_id=request_id,
        now=utcnow(),
    )
    (seq,) = conn.execute(_INSERT_TASK, values).inserted_primary_key or (None,)
    announce(conn)  # wakes listening workers when this transaction commits (PostgreSQL)
    values.update(
        seq=seq,
        worker_id=None,
        error_code=None,
        error_type=None,
        error_message=None,
        started_at=None,
        completed_at=None,
        expires_at=None,
        batch_id=None,
        batch_index=None,
    )
    counted = own + 1 if max_waiting_per_key is not None else 0
    task = _task(values, ())
    if own >= positions.READ_CAP and task.priority == max(PriorityClass):
        # Past what one replay reads (store/positions.py): the bound, every waiting task, this one
        # the last of its key, from the counter read above. (`own` counts every class: a task
        # of an earlier class may be near the front of its own, and is positioned below.)
        return replace(task, queue_position=waiting + 1), counted
    (task,) = _positioned(conn, [task], batch_size)
    return task, counted


def task_values(
    *,
    task_id: str,
    key_id: str,
    request: GenerationRequest,
    steps: int,
    guidance_scale: float,
    price: int,
    max_attempts: int,
    base_url: str | None,
    surface: str,
    request_id: str | None,
    now: datetime,
    priority: PriorityClass = PriorityClass.INTERACTIVE,
) -> dict[str, Any]:
    """The `tasks` row of a new waiting task (a submit's, or one line of a batch's)."""
    return {
        "id": task_id,
        "key_id": key_id,
        "state": TaskState.QUEUED,
        "stage": Stage.QUEUED,
        "model": request.model,
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "width": request.size.width,
        "height": request.size.height,
        "quality": request.quality,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "n": request.n,
        "seeds": image_seeds(request.seed, request.n),
        "seed_given": request.seed is not None,
        "output_format": request.output_format,
        "output_compression": request.output_compression,
        "user_id": request.user_id,
        "callback_url": request.callback_url,
        "base_url": base_url,
        "surface": surface,
        "request_id": request_id,
        "priority": priority,
        "previews": request.previews or None,
        "previews_made": None,
        "step": 0,
        "attempts": 0,
        "max_attempts": max_attempts,
        "credits_charged": price,
        "credits_refunded": 0,
        "created_at": now,
    }


def get_task(
    conn: Connection, task_id: str, *, key_id: str | None = None, batch_size: int = 1
) -> Task:
    """The task, with images and queue position (for workers claiming `batch_size` tasks at a
    time). With `key_id`, another key's task is NotFound."""
    if key_id is None:
        row = conn.execute(_TASK, {"task_id": task_id}).first()
    else:
        row = conn.execute(_OWN_TASK, {"task_id": task_id, "key_id": key_id}).first()
    if row is None:
        raise NotFound(f"No task with id {task_id!r}.")
    return _task_in_full(conn, row._mapping, batch_size)


def find_key_and_own_task(
    conn: Connection, *, secret: str, task_id: str, batch_size: int = 1
) -> tuple[ApiKey | None, Task | None]:
    """The key of a bearer secret (None: no such key) and its task of that id (None: no such
    task, or another key's), read together by one statement."""
    row = conn.execute(
        _KEY_AND_OWN_TASK, {"key_hash": hash_key(secret), "task_id": task_id}
    ).first()
    if row is None:
        return None, None
    m = row._mapping
    key = key_from({c.name: m["key_" + c.name] for c in api_keys.c})
    return key, (None if m["id"] is None else _task_in_full(conn, m, batch_size))


def _task_in_full(conn: Connection, m: Any, batch_size: int) -> Task:
    """The task of a row of `tasks`, with its images, webhook and queue position."""
    state = TaskState(m["state"])
    # Images are written in the transaction that completes the task, and only then.
    task = _task(m, _task_images(conn, m["id"]) if state is TaskState.COMPLETED else ())
    if m["previews_made"]:  # one more read for the tasks that have previews, none for others
        task = replace(task, preview_list=preview_store.task_previews(conn, task.id))
    if task.callback_url is not None:
        task = replace(task, webhook=deliveries_of(conn, [task.id]).get(task.id))
    if state is TaskState.QUEUED:
        (task,) = _positioned(conn, [task], batch_size)
    return task


def _positioned(conn: Connection, found: Sequence[Task], batch_size: int) -> list[Task]:
    """The tasks, each waiting one with its queue position (store/positions.py)."""
    queued = [positions.Waiting(t.id, t.key_id, t.seq, BatchKey.of(t), t.priority) for t in found]
    queued = [w for w, t in zip(queued, found, strict=True) if t.state is TaskState.QUEUED]
    at = positions.queue_positions(conn, queued, batch_size=batch_size)
    return [replace(t, queue_position=at[t.id]) if t.id in at else t for t in found]


def list_tasks(
    conn: Connection,
    *,
    key_id: str,
    limit: int,
    before_seq: int | None = None,
    states: Sequence[TaskState] | None = None,
    batch_size: int = 1,
) -> list[Task]:
    """The key's tasks, newest first, strictly older than `before_seq` when given; waiting ones
    with their queue position, as `get_task` gives it."""
    query = select(tasks).where(tasks.c.key_id == key_id)
    if before_seq is not None:
        query = query.where(tasks.c.seq < before_seq)
    if states:
        query = query.where(tasks.c.state.in_([s.value for s in states]))
    rows = conn.execute(query.order_by(tasks.c.seq.desc()).limit(limit)).all()
    return tasks_in_full(conn, rows, batch_size)


def tasks_in_full(conn: Connection, rows: Sequence[Any], batch_size: int) -> list[Task]:
    """The tasks of rows of `tasks`, with their images, webhooks and queue positions, read for
    all of them at once."""
    imgs = _images(conn, [r.id for r in rows])
    hooks = deliveries_of(conn, [r.id for r in rows if r.callback_url is not None])
    shown = preview_store.previews_of(conn, [r.id for r in rows if r.previews_made])
    found = [
        replace(
            _task(r._mapping, imgs.get(r.id, ())),
            webhook=hooks.get(r.id),
            preview_list=shown.get(r.id, ()),
        )
        for r in rows
    ]
    return _positioned(conn, found, batch_size)


def complete_task(
    conn: Connection,
    *,
    task_id: str,
    worker_id: str,
    records: Sequence[ImageRecord],
    retention: timedelta,
) -> bool:
    """Mark a running task done with its images, and queue its webhook if it asked for one.
    False if this worker no longer owns it."""
    now = utcnow()
    expires = now + retention
    result = conn.execute(
        update(tasks)
        .where(_owned(task_id, worker_id))
        .values(
            state=TaskState.COMPLETED,
            stage=Stage.DONE,
            step=tasks.c.steps,
            completed_at=now,
            expires_at=expires,
            lease_expires_at=None,
        )
        .returning(tasks.c.batch_id)
    )
    settled = result.first()
    if settled is None:
        return False
    conn.execute(
        insert(images),
        [
            {
                "token": r.token,
                "task_id": task_id,
                "idx": r.index,
                "width": r.width,
                "height": r.height,
                "seed": r.seed,
                "format": r.format,
                "storage_key": r.storage_key,
                "expires_at": expires,
                "size_bytes": r.size_bytes,
                "sha256": r.sha256,
            }
            for r in records
        ],
    )
    enqueue_delivery(conn, task_id=task_id)
    if settled.batch_id is not None:
        batch_task_ended(conn, settled.batch_id)
    announce_change(conn)
    return True


def live_task_ids(conn: Connection, *, key_id: str) -> list[str]:
    """The key's tasks that are waiting or running, oldest first."""
    return list(
        conn.execute(
            select(tasks.c.id)
            .where(
                tasks.c.key_id == key_id,
                tasks.c.state.in_([TaskState.QUEUED, TaskState.RUNNING]),
            )
            .order_by(tasks.c.seq)
        ).scalars()
    )


def fail_task(
    conn: Connection,
    *,
    task_id: str,
    error_code: int,
    error_type: str,
    message: str,
    worker_id: str | None = None,
    state: TaskState = TaskState.FAILED,
) -> bool:
    """Move a live task to FAILED (or CANCELLED), refund it and queue its webhook if it asked
    for one, in one transaction. Every terminal transition but completion comes through here:
    worker failures, cancel, and the lease reclaim's last attempt (store/queue.py).

    With `worker_id`, only if that worker still holds the task. False if nothing changed.
    """
    live = tasks.c.state.in_([TaskState.QUEUED, TaskState.RUNNING])
    where = _owned(task_id, worker_id) if worker_id else and_(tasks.c.id == task_id, live)
    row = conn.execute(
        select(tasks.c.key_id, tasks.c.credits_charged, tasks.c.batch_id).where(where)
    ).first()
    if row is None:
        return False
    result = conn.execute(
        update(tasks)
        .where(where)
        .values(
            state=state,
            credits_refunded=row.credits_charged,
            error_code=error_code,
            error_type=error_type,
            error_message=message,
            completed_at=utcnow(),
            lease_expires_at=None,
        )
    )
    if result.rowcount != 1:
        return False
    if row.credits_charged:
        add_credits(
            conn, key_id=row.key_id, amount=int(row.credits_charged), kind="refund", task_id=task_id
        )
    enqueue_delivery(conn, task_id=task_id)
    if row.batch_id is not None:
        batch_task_ended(conn, row.batch_id)
    announce_change(conn)
    return True


def cancel_task(conn: Connection, *, task_id: str, message: str) -> bool:
    """Move a live task to CANCELLED with a refund (fail_task); False if it was not live."""
    return fail_task(
        conn,
        task_id=task_id,
        error_code=CANCELLED_CODE,
        error_type=CANCELLED_TYPE,
        message=message,
        state=TaskState.CANCELLED,
    )


def record_progress(
    conn: Connection, *, worker_id: str, progress: Mapping[str, tuple[Stage, int | None]]
) -> set[str]:
    """Record the stage (and step, where not None) of several running tasks of one worker in
    the caller's one transaction: one `UPDATE ... RETURNING id` per distinct (stage, step), so
    one for a batch whose tasks step together. Returns the ids this worker still holds; a task
    left out was cancelled, or its lease lapsed and it went back to the queue or to another
    worker, and must stop."""
    by_value: dict[tuple[Stage, int | None], list[str]] = {}
    for task_id, value in progress.items():
        by_value.setdefault(value, []).append(task_id)
    held: set[str] = set()
    for (stage, step), ids in by_value.items():
        values: dict[str, Any] = {"stage": stage}
        if step is not None:
            values["step"] = step
        held.update(
            conn.execute(
                update(tasks)
                .where(
                    tasks.c.id.in_(ids),
                    tasks.c.state == TaskState.RUNNING,
                    tasks.c.worker_id == worker_id,
                )
                .values(**values)
                .returning(tasks.c.id)
            ).scalars()
        )
    if held:
        announce_change(conn)
    return held


def expired_images(conn: Connection, now: datetime, limit: int = 500) -> list[tuple[str, str]]:
    """(token, storage key) of up to `limit` images, and as many previews, past their retention
    whose files are still to be deleted."""
    found: list[tuple[str, str]] = []
    for table in (images, previews):
        rows = conn.execute(
            select(table.c.token, table.c.storage_key)
            .where(table.c.expires_at <= now, table.c.deleted_at.is_(None))
            .limit(limit)
        ).all()
        found += [(r.token, r.storage_key) for r in rows]
    return found


def mark_images_deleted(conn: Connection, tokens: Sequence[str]) -> None:
    if tokens:
        for table in (images, previews):
            conn.execute(update(table).where(table.c.token.in_(tokens)).values(deleted_at=utcnow()))


@dataclass(frozen=True)
class StoredImage:
    storage_key: str
    format: str
    expires_at: datetime
    size_bytes: int | None
    sha256: str | None


def find_image(conn: Connection, token: str) -> StoredImage | None:
    """Where a live image (or a task's preview) is stored and what its file must be, or None."""
    for table in (images, previews):
        row = conn.execute(
            select(
                table.c.storage_key,
                table.c.format,
                table.c.expires_at,
                table.c.size_bytes,
                table.c.sha256,
            ).where(table.c.token == token, table.c.deleted_at.is_(None))
        ).first()
        if row is not None:
            return StoredImage(**row._mapping)
    return None


def _owned(task_id: str, worker_id: str | None) -> Any:
    return and_(
        tasks.c.id == task_id,
        tasks.c.state == TaskState.RUNNING,
        tasks.c.worker_id == worker_id,
    )


def _images(conn: Connection, task_ids: Sequence[str]) -> dict[str, tuple[ImageRecord, ...]]:
    if not task_ids:
        return {}
    rows = conn.execute(
        select(images).where(images.c.task_id.in_(task_ids)).order_by(images.c.idx)
    ).all()
    out: dict[str, list[ImageRecord]] = {}
    for r in rows:
        out.setdefault(r.task_id, []).append(_image(r))
    return {k: tuple(v) for k, v in out.items()}


def _task_images(conn: Connection, task_id: str) -> tuple[ImageRecord, ...]:
    return tuple(_image(r) for r in conn.execute(_TASK_IMAGES, {"task_id": task_id}))


def _image(r: Any) -> ImageRecord:
    return ImageRecord(
        token=r.token,
        index=r.idx,
        width=r.width,
        height=r.height,
        seed=int(r.seed),
        format=r.format,
        storage_key=r.storage_key,
    )


def task_of_row(m: Any) -> Task:
    """The task of a mapping of `tasks` columns (a claim's RETURNING row), without images."""
    return _task(m, ())


def _task(m: Any, imgs: tuple[ImageRecord, ...]) -> Task:
    return Task(
        id=m["id"],
        seq=m["seq"],
        key_id=m["key_id"],
        state=TaskState(m["state"]),
        stage=Stage(m["stage"]),
        model=m["model"],
        prompt=m["prompt"],
        negative_prompt=m["negative_prompt"],
        width=m["width"],
        height=m["height"],
        quality=m["quality"],
        steps=m["steps"],
        guidance_scale=m["guidance_scale"],
        n=m["n"],
        seeds=tuple(int(s) for s in m["seeds"]),
        seed_given=bool(m["seed_given"]),
        output_format=m["output_format"],
        output_compression=m["output_compression"],
        user_id=m["user_id"],
        callback_url=m["callback_url"],
        base_url=m["base_url"],
        request_id=m["request_id"],
        surface=m["surface"],
        step=m["step"],
        attempts=m["attempts"],
        credits_charged=int(m["credits_charged"]),
        credits_refunded=int(m["credits_refunded"]),
        error_code=m["error_code"],
        error_type=m["error_type"],
        error_message=m["error_message"],
        created_at=m["created_at"],
        started_at=m["started_at"],
        completed_at=m["completed_at"],
        expires_at=m["expires_at"],
        worker_id=m["worker_id"],
        priority=PriorityClass(m["priority"]),
        images=imgs,
        batch_id=m["batch_id"],
        batch_index=m["batch_index"],
        previews=m["previews"] or 0,
    )
