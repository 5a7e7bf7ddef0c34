"""The admin audit log: one row per admin action, written in the action's own transaction."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from cogview_api.clock import utcnow
from cogview_api.store.tables import admin_audit


@dataclass(frozen=True)
class AuditEntry:
    id: int
    at: datetime
    actor: str
    action: str
    key_id: str | None
    detail: dict[str, Any]


def record(
    conn: Connection,
    *,
    actor: str,
    action: str,
    key_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        insert(admin_audit).values(
            at=utcnow(),
            actor=actor[:64],
            action=action,
            key_id=key_id,
            detail=json.dumps(detail, sort_keys=True) if detail else None,
        )
    )


def page(
    conn: Connection, *, limit: int, before_id: int | None = None, key_id: str | None = None
) -> list[AuditEntry]:
    """Audit rows, newest first, strictly older than `before_id` when given."""
    query = select(admin_audit)
    if before_id is not None:
        query = query.where(admin_audit.c.id < before_id)
    if key_id is not None:
        query = query.where(admin_audit.c.key_id == key_id)
    rows = conn.execute(query.order_by(admin_audit.c.id.desc()).limit(limit))
    return [
        AuditEntry(
            id=int(r.id),
            at=r.at,
            actor=r.actor,
            action=r.action,
            key_id=r.key_id,
            detail=json.loads(r.detail) if r.detail else {},
        )
        for r in rows
    ]
