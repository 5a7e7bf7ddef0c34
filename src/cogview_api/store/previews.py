"""Partial previews of tasks being denoised: their rows, written by the worker that holds the
task (worker/previews.py) and read with the task. Their files are served and deleted like
images' (`tasks.find_image`, `tasks.expired_images` look in both tables)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, func, insert, select, update
from sqlalchemy.engine import Connection

from cogview_api.domain import PreviewRecord, TaskState
from cogview_api.store.notify import announce_change
from cogview_api.store.tables import previews, tasks

_TASK_PREVIEWS = (
    select(previews)
    .where(previews.c.task_id == bindparam("task_id"), previews.c.deleted_at.is_(None))
    .order_by(previews.c.idx)
)


def has_preview(conn: Connection, *, task_id: str, index: int) -> bool:
    """Whether the task has its preview `index` already (from an earlier attempt: the same seed
    gives the same preview, so a retried task keeps the first one)."""
    found = conn.execute(
        select(exists().where(previews.c.task_id == task_id, previews.c.idx == index))
    ).scalar_one()
    return bool(found)


def insert_preview(
    conn: Connection,
    *,
    worker_id: str,
    task_id: str,
    record: PreviewRecord,
    size_bytes: int,
    sha256: str,
    expires_at: datetime,
) -> bool:
    """Record a stored preview of a task this worker holds, and count it on the task (the
    watcher's version of it, so its streams get a frame). False, and nothing written, if the
    worker no longer holds the task or the task has this preview already."""
    held = and_(
        tasks.c.id == task_id,
        tasks.c.state == TaskState.RUNNING,
        tasks.c.worker_id == worker_id,
        ~exists().where(previews.c.task_id == task_id, previews.c.idx == record.index),
    )
    result = conn.execute(
        update(tasks).where(held).values(previews_made=func.coalesce(tasks.c.previews_made, 0) + 1)
    )
    if result.rowcount != 1:
        return False
    conn.execute(
        insert(previews).values(
            token=record.token,
            task_id=task_id,
            idx=record.index,
            step=record.step,
            width=record.width,
            height=record.height,
            format=record.format,
            storage_key=record.storage_key,
            size_bytes=size_bytes,
            sha256=sha256,
            expires_at=expires_at,
        )
    )
    announce_change(conn)
    return True


def task_previews(conn: Connection, task_id: str) -> tuple[PreviewRecord, ...]:
    return tuple(_record(r) for r in conn.execute(_TASK_PREVIEWS, {"task_id": task_id}))


def previews_of(conn: Connection, task_ids: Sequence[str]) -> dict[str, tuple[PreviewRecord, ...]]:
    if not task_ids:
        return {}
    rows = conn.execute(
        select(previews)
        .where(previews.c.task_id.in_(task_ids), previews.c.deleted_at.is_(None))
        .order_by(previews.c.idx)
    ).all()
    out: dict[str, list[PreviewRecord]] = {}
    for r in rows:
        out.setdefault(r.task_id, []).append(_record(r))
    return {k: tuple(v) for k, v in out.items()}


def _record(r: Any) -> PreviewRecord:
    return PreviewRecord(
        token=r.token,
        index=r.idx,
        step=r.step,
        width=r.width,
        height=r.height,
        format=r.format,
        storage_key=r.storage_key,
    )
