"""Usage reports and the credit ledger, for a key holder (their own) and the operator (all).

A report covers whole UTC days, `start` to `end` inclusive: at most MAX_DAYS, the last
DEFAULT_DAYS (today included) when no range is given. Credits come from the ledger's `reserve`
and `refund` rows, so a report's `credits` is, to the credit, the ledger's sum over the range.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any, Literal

from cogview_api.clock import utcnow
from cogview_api.errors import InvalidRequest
from cogview_api.services import audit, paging
from cogview_api.services.keys import authenticate_in
from cogview_api.store import keys as key_store
from cogview_api.store import usage as usage_store
from cogview_api.store.db import Database
from cogview_api.store.usage import LedgerRow as LedgerRow
from cogview_api.store.usage import UsageCell as UsageCell

MAX_DAYS = 366
DEFAULT_DAYS = 30
LEDGER_CURSOR = "l"
EXPORT_BATCH = 500
ExportFormat = Literal["csv", "jsonl"]
EXPORT_FORMATS: tuple[ExportFormat, ...] = ("csv", "jsonl")
EXPORT_COLUMNS = (
    "id",
    "created_at",
    "key_id",
    "kind",
    "amount",
    "task_id",
    "quality",
    "surface",
    "note",
)


@dataclass(frozen=True)
class DateRange:
    start: date
    end: date  # inclusive

    def bounds(self) -> tuple[datetime, datetime]:
        """[first instant, first instant after) of the range, in UTC."""
        first = datetime.combine(self.start, time(), tzinfo=UTC)
        return first, datetime.combine(self.end + timedelta(days=1), time(), tzinfo=UTC)


# Days a range may name: a range's arithmetic (a default `from` 29 days before `to`, the
# instant after `to`) stays inside what `date` can hold, and no ledger row predates 1970.
FIRST_DAY = date(1970, 1, 1)
LAST_DAY = date(9998, 12, 31)


def _parse_day(value: str, param: str) -> date:
    try:
        if len(value) != 10 or value[4] != "-" or value[7] != "-":  # not 2026-W49-3
            raise ValueError(value)
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"{param} must be a date as YYYY-MM-DD (UTC), got {value[:40]!r}", param=param
        ) from exc
    if not FIRST_DAY <= day <= LAST_DAY:
        raise InvalidRequest(
            f"{param} must be a day from {FIRST_DAY} to {LAST_DAY}, got {value!r}", param=param
        )
    return day


def date_range(start: str | None, end: str | None, *, today: date | None = None) -> DateRange:
    """The range asked for by the `from` and `to` query values, checked. Either may be left
    out: `to` defaults to today (UTC), `from` to DEFAULT_DAYS before `to`, inclusive."""
    today = today or utcnow().date()
    last = _parse_day(end, "to") if end is not None else None
    first = _parse_day(start, "from") if start is not None else None
    if last is None:
        last = max(today, first) if first is not None else today
    if first is None:
        first = last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidRequest("from must not be after to", param="from")
    if (last - first).days + 1 > MAX_DAYS:
        raise InvalidRequest(f"a range covers at most {MAX_DAYS} days", param="from")
    return DateRange(first, last)


@dataclass(frozen=True)
class Totals:
    tasks: int = 0
    images: int = 0
    credits_charged: int = 0
    credits_refunded: int = 0

    @property
    def credits(self) -> int:
        """Net credits spent: charged less refunded."""
        return self.credits_charged - self.credits_refunded

    def plus(self, c: UsageCell | Totals) -> Totals:
        return Totals(
            tasks=self.tasks + c.tasks,
            images=self.images + c.images,
            credits_charged=self.credits_charged + c.credits_charged,
            credits_refunded=self.credits_refunded + c.credits_refunded,
        )


@dataclass(frozen=True)
class UsageReport:
    range: DateRange
    key_id: str | None
    cells: list[UsageCell]  # per (day, key, quality, surface), sorted
    days: dict[date, Totals] = field(default_factory=dict)  # per day, days with no use left out
    totals: Totals = Totals()


def _report(cells: list[UsageCell], span: DateRange, key_id: str | None) -> UsageReport:
    days: dict[date, Totals] = {}
    totals = Totals()
    for c in cells:
        days[c.day] = days.get(c.day, Totals()).plus(c)
        totals = totals.plus(c)
    return UsageReport(range=span, key_id=key_id, cells=cells, days=days, totals=totals)


def usage_for(
    db: Database, *, secret: str | None, start: str | None, end: str | None
) -> UsageReport:
    """The bearer key's own usage over the range."""
    span = date_range(start, end)
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        lo, hi = span.bounds()
        cells = usage_store.usage_cells(conn, start=lo, end=hi, key_id=key.id)
    return _report(cells, span, key.id)


def usage_report(
    db: Database, *, actor: str, start: str | None, end: str | None, key_id: str | None = None
) -> UsageReport:
    """Every key's usage (or `key_id`'s: NotFound if unknown) over the range."""
    span = date_range(start, end)
    if key_id is not None:
        with db.read() as conn:
            key_store.get_key(conn, key_id)
    audit.record(
        db,
        actor=actor,
        action="usage.read",
        key_id=key_id,
        detail={"from": span.start.isoformat(), "to": span.end.isoformat()},
    )
    with db.read() as conn:
        lo, hi = span.bounds()
        cells = usage_store.usage_cells(conn, start=lo, end=hi, key_id=key_id)
    return _report(cells, span, key_id)


def ledger_for(
    db: Database, *, secret: str | None, limit: int, cursor: str | None
) -> tuple[list[LedgerRow], str | None]:
    """One page of the bearer key's ledger, newest first, and the next page's cursor."""
    with db.read() as conn:
        key = authenticate_in(conn, secret)
        paging.check_limit(limit)
        before = paging.decode_cursor(LEDGER_CURSOR, cursor) if cursor else None
        page = usage_store.ledger_page(conn, key_id=key.id, limit=limit + 1, before_id=before)
    if len(page) > limit:
        return page[:limit], paging.encode_cursor(LEDGER_CURSOR, page[limit - 1].id)
    return page, None


def ledger_of(
    db: Database, *, actor: str, key_id: str, limit: int, cursor: str | None
) -> tuple[list[LedgerRow], str | None]:
    """One page of a key's ledger for the operator (NotFound if unknown), newest first."""
    paging.check_limit(limit)
    before = paging.decode_cursor(LEDGER_CURSOR, cursor) if cursor else None
    with db.read() as conn:
        key_store.get_key(conn, key_id)
    audit.record(db, actor=actor, action="ledger.read", key_id=key_id)
    with db.read() as conn:
        page = usage_store.ledger_page(conn, key_id=key_id, limit=limit + 1, before_id=before)
    if len(page) > limit:
        return page[:limit], paging.encode_cursor(LEDGER_CURSOR, page[limit - 1].id)
    return page, None


def ledger_record(row: LedgerRow) -> dict[str, Any]:
    """A ledger row as the exports and the API write it."""
    return {
        "id": row.id,
        "created_at": row.created_at.isoformat().replace("+00:00", "Z"),
        "key_id": row.key_id,
        "kind": row.kind,
        "amount": row.amount,
        "task_id": row.task_id,
        "quality": row.quality,
        "surface": row.surface,
        "note": row.note,
    }


def export_ledger(
    db: Database,
    *,
    actor: str,
    fmt: str,
    key_id: str | None = None,
    start: str | None = None,
    end: str | None = None,
) -> Iterator[str]:
    """The ledger, oldest first, as CSV (with a header line) or JSON Lines: checked and logged
    now, then read lazily in batches of EXPORT_BATCH rows, each in its own short transaction
    (no connection is held while a slow client reads). It ends at the last row that existed
    when it started, so it is a fixed cut even while credits move. Only the rows of `key_id`
    (NotFound if unknown), and of the UTC days from `start` to `end` (either may be left out)."""
    if fmt not in EXPORT_FORMATS:
        raise InvalidRequest("format must be csv or jsonl", param="format")
    # Any span, open at either end: an export may cover years.
    first = _parse_day(start, "from") if start is not None else None
    last = _parse_day(end, "to") if end is not None else None
    if first is not None and last is not None and first > last:
        raise InvalidRequest("from must not be after to", param="from")
    lo = None if first is None else DateRange(first, first).bounds()[0]
    hi = None if last is None else DateRange(last, last).bounds()[1]
    with db.read() as conn:
        if key_id is not None:
            key_store.get_key(conn, key_id)
        up_to = usage_store.last_ledger_id(conn)
    audit.record(
        db,
        actor=actor,
        action="ledger.export",
        key_id=key_id,
        detail={"format": fmt, "from": start, "to": end},
    )
    return _export_lines(db, fmt=fmt, key_id=key_id, lo=lo, hi=hi, up_to=up_to)


def _export_lines(
    db: Database,
    *,
    fmt: str,
    key_id: str | None,
    lo: datetime | None,
    hi: datetime | None,
    up_to: int,
) -> Iterator[str]:
    if fmt == "csv":
        yield _csv_line(EXPORT_COLUMNS)
    after = 0
    while True:
        with db.read() as conn:
            batch = usage_store.ledger_batch(
                conn,
                after_id=after,
                up_to_id=up_to,
                limit=EXPORT_BATCH,
                key_id=key_id,
                start=lo,
                end=hi,
            )
        if not batch:
            return
        for row in batch:
            record = ledger_record(row)
            if fmt == "csv":
                yield _csv_line([record[c] for c in EXPORT_COLUMNS])
            else:
                yield json.dumps(record, separators=(",", ":")) + "\n"
        after = batch[-1].id


def _csv_line(values: Any) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(["" if v is None else v for v in values])
    return out.getvalue()
