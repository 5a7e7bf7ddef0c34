"""Submits of the synchronous OpenAI and Zhipu routes, remembered so that an SDK's retry joins
the task of the request it repeats instead of paying for a second one.

`record` is written in the submit's transaction, with the task; `find_retried` is the one
indexed look-up (key_id, request_hash) that a retry costs; `mark` notes whether the answer
reached the client (`gone` when it hung up first, `delivered` once answered), which is what
tells an unmarked retry from a deliberate second request (rule in docs/api.md, "Retries").
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal

from sqlalchemy import Connection, delete, insert, or_, select, update

from cogview_api.domain import TaskState
from cogview_api.store.tables import sync_requests, tasks

Answer = Literal["gone", "timed_out", "delivered"]

# A retry joins only a task that is still going or has its images: a failed or cancelled one
# (refunded) is tried again as a new task.
_JOINABLE = (TaskState.QUEUED.value, TaskState.RUNNING.value, TaskState.COMPLETED.value)


def record(
    conn: Connection,
    *,
    key_id: str,
    request_hash: str,
    task_id: str,
    now: datetime,
    window: timedelta,
) -> None:
    """Remember a new task's request, after deleting this key's rows older than the window
    (the purge rides on the inserts, a small range of one key's index)."""
    conn.execute(
        delete(sync_requests).where(
            sync_requests.c.key_id == key_id, sync_requests.c.created_at <= now - window
        )
    )
    conn.execute(
        insert(sync_requests).values(
            task_id=task_id, key_id=key_id, request_hash=request_hash, created_at=now
        )
    )


def find_retried(
    conn: Connection,
    *,
    key_id: str,
    request_hash: str,
    since: datetime,
    marked: bool,
) -> str | None:
    """The id of the newest task, made since `since` by the same key, surface and body, that
    a retry joins: one still going or completed whose answer never reached its client. Its
    client hung up (`gone`), or, for a retry with an SDK's marker (`marked`), got a 504
    (`timed_out`). Never one whose request is still waiting (NULL): a marked retry of an
    attempt that was refused (429, 503: no task) must not join another client's identical
    request."""
    answered = (
        sync_requests.c.answer.in_(("gone", "timed_out"))
        if marked
        else sync_requests.c.answer == "gone"
    )
    row = conn.execute(
        select(sync_requests.c.task_id)
        .join(tasks, tasks.c.id == sync_requests.c.task_id)
        .where(
            sync_requests.c.key_id == key_id,
            sync_requests.c.request_hash == request_hash,
            sync_requests.c.created_at > since,
            answered,
            tasks.c.state.in_(_JOINABLE),
        )
        .order_by(sync_requests.c.created_at.desc())
        .limit(1)
    ).first()
    return None if row is None else str(row.task_id)


def mark(conn: Connection, *, task_id: str, answer: Answer) -> None:
    """Note how the task's request ended. `gone` never overwrites `delivered`: a later request
    that got the images makes the task a finished answer, not a pending one; `timed_out` (a
    504) overwrites nothing, so a task whose client hung up stays joinable without a marker."""
    query = update(sync_requests).where(sync_requests.c.task_id == task_id)
    if answer == "gone":
        query = query.where(
            or_(sync_requests.c.answer.is_(None), sync_requests.c.answer != "delivered")
        )
    elif answer == "timed_out":
        query = query.where(sync_requests.c.answer.is_(None))
    conn.execute(query.values(answer=answer))
