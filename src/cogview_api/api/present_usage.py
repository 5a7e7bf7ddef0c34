"""Usage reports and ledger rows -> wire schemas (the native and the admin API share them)."""

from __future__ import annotations

from cogview_api.api.schemas import (
    LedgerEntryPublic,
    LedgerPage,
    UsageDay,
    UsageFigures,
    UsageReportPublic,
    UsageRow,
)
from cogview_api.services.usage import LedgerRow, Totals, UsageCell, UsageReport


def _figures(t: Totals | UsageCell) -> dict[str, int]:
    charged, refunded = t.credits_charged, t.credits_refunded
    return {
        "tasks": t.tasks,
        "images": t.images,
        "credits_charged": charged,
        "credits_refunded": refunded,
        "credits": charged - refunded,
    }


def usage_public(report: UsageReport) -> UsageReportPublic:
    return UsageReportPublic(
        **{"from": report.range.start},
        to=report.range.end,
        key_id=report.key_id,
        totals=UsageFigures(**_figures(report.totals)),
        days=[UsageDay(date=d, **_figures(t)) for d, t in sorted(report.days.items())],
        rows=[
            UsageRow(
                date=c.day, key_id=c.key_id, quality=c.quality, surface=c.surface, **_figures(c)
            )
            for c in report.cells
        ],
    )


def ledger_entry_public(row: LedgerRow) -> LedgerEntryPublic:
    return LedgerEntryPublic(
        id=row.id,
        created_at=row.created_at,
        key_id=row.key_id,
        kind=row.kind,
        amount=row.amount,
        task_id=row.task_id,
        quality=row.quality,
        surface=row.surface,
        note=row.note,
    )


def ledger_page(rows: list[LedgerRow], next_cursor: str | None) -> LedgerPage:
    return LedgerPage(
        entries=[ledger_entry_public(r) for r in rows],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )
