"""Usage and ledger queries: per-day sums for the usage reports, pages and batches of ledger rows.

A day is a UTC calendar day. Credits are counted from the ledger (its `reserve` and `refund`
rows, by the row's time), tasks from their `reserve` rows (one per task), images from the
`images` rows of tasks completed that day: every figure can be traced to rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import Connection, Date, and_, case, cast, func, select
from sqlalchemy.sql.elements import ColumnElement

from cogview_api.store.tables import images, ledger, tasks


@dataclass(frozen=True)
class UsageCell:
    """One key's usage on one day, for one quality and surface."""

    day: date
    key_id: str
    quality: str
    surface: str
    tasks: int = 0
    images: int = 0
    credits_charged: int = 0  # reserved at submit, a positive number
    credits_refunded: int = 0  # given back on failure or cancel


@dataclass(frozen=True)
class LedgerRow:
    id: int
    key_id: str
    kind: str
    amount: int
    task_id: str | None
    note: str | None
    created_at: datetime
    quality: str | None
    surface: str | None


def _day(conn: Connection, column: Any) -> ColumnElement[Any]:
    """The UTC date of a timestamp column. SQLite holds naive UTC text; PostgreSQL a
    timestamptz, whose date would otherwise follow the session's time zone."""
    if conn.dialect.name == "postgresql":
        return cast(func.timezone("UTC", column), Date)
    return func.date(column)


def _as_date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value))


def usage_cells(
    conn: Connection, *, start: datetime, end: datetime, key_id: str | None = None
) -> list[UsageCell]:
    """Usage in [start, end), per (day, key, quality, surface), sorted by those."""
    cells: dict[tuple[date, str, str, str], dict[str, int]] = {}

    def cell(day: Any, key: str, quality: str, surface: str) -> dict[str, int]:
        return cells.setdefault((_as_date(day), key, quality, surface), {})

    day = _day(conn, ledger.c.created_at).label("day")
    moves = (
        select(
            day,
            ledger.c.key_id,
            tasks.c.quality,
            tasks.c.surface,
            func.sum(case((ledger.c.kind == "reserve", 1), else_=0)),
            func.sum(case((ledger.c.kind == "reserve", -ledger.c.amount), else_=0)),
            func.sum(case((ledger.c.kind == "refund", ledger.c.amount), else_=0)),
        )
        .select_from(ledger.join(tasks, tasks.c.id == ledger.c.task_id))
        .where(
            ledger.c.kind.in_(("reserve", "refund")),
            ledger.c.created_at >= start,
            ledger.c.created_at < end,
        )
        .group_by(day, ledger.c.key_id, tasks.c.quality, tasks.c.surface)
    )
    if key_id is not None:
        moves = moves.where(ledger.c.key_id == key_id)
    for d, key, quality, surface, n_tasks, charged, refunded in conn.execute(moves):
        c = cell(d, key, quality, surface)
        c["tasks"] = int(n_tasks)
        c["credits_charged"] = int(charged)
        c["credits_refunded"] = int(refunded)

    done = _day(conn, tasks.c.completed_at).label("day")
    made = (
        select(done, tasks.c.key_id, tasks.c.quality, tasks.c.surface, func.count())
        .select_from(images.join(tasks, tasks.c.id == images.c.task_id))
        .where(and_(tasks.c.completed_at >= start, tasks.c.completed_at < end))
        .group_by(done, tasks.c.key_id, tasks.c.quality, tasks.c.surface)
    )
    if key_id is not None:
        made = made.where(tasks.c.key_id == key_id)
    for d, key, quality, surface, n_images in conn.execute(made):
        cell(d, key, quality, surface)["images"] = int(n_images)

    return [
        UsageCell(day=d, key_id=k, quality=q, surface=s, **counts)
        for (d, k, q, s), counts in sorted(cells.items())
    ]


def _ledger_query() -> Any:
    return select(
        ledger.c.id,
        ledger.c.key_id,
        ledger.c.kind,
        ledger.c.amount,
        ledger.c.task_id,
        ledger.c.note,
        ledger.c.created_at,
        tasks.c.quality,
        tasks.c.surface,
    ).select_from(ledger.outerjoin(tasks, tasks.c.id == ledger.c.task_id))


def _row(r: Any) -> LedgerRow:
    return LedgerRow(
        id=int(r.id),
        key_id=r.key_id,
        kind=r.kind,
        amount=int(r.amount),
        task_id=r.task_id,
        note=r.note,
        created_at=r.created_at,
        quality=r.quality,
        surface=r.surface,
    )


def ledger_page(
    conn: Connection, *, key_id: str, limit: int, before_id: int | None = None
) -> list[LedgerRow]:
    """The key's ledger rows, newest first, strictly older than `before_id` when given."""
    query = _ledger_query().where(ledger.c.key_id == key_id)
    if before_id is not None:
        query = query.where(ledger.c.id < before_id)
    return [_row(r) for r in conn.execute(query.order_by(ledger.c.id.desc()).limit(limit))]


def last_ledger_id(conn: Connection) -> int:
    return int(conn.execute(select(func.coalesce(func.max(ledger.c.id), 0))).scalar_one())


def ledger_batch(
    conn: Connection,
    *,
    after_id: int,
    up_to_id: int,
    limit: int,
    key_id: str | None = None,
    start: datetime | None = None,
    end: datetime | None = None,
) -> Sequence[LedgerRow]:
    """Up to `limit` ledger rows with after_id < id <= up_to_id, oldest first, filtered."""
    query = _ledger_query().where(ledger.c.id > after_id, ledger.c.id <= up_to_id)
    if key_id is not None:
        query = query.where(ledger.c.key_id == key_id)
    if start is not None:
        query = query.where(ledger.c.created_at >= start)
    if end is not None:
        query = query.where(ledger.c.created_at < end)
    return [_row(r) for r in conn.execute(query.order_by(ledger.c.id).limit(limit))]
