"""The admin audit log: who did what to which key, and when.

Actions that change something write their row in their own transaction (services/keys.py);
the admin API's reads (key lists, usage, exports, this log) write theirs here, before reading.
"""

from __future__ import annotations

from typing import Any

from cogview_api.services import paging
from cogview_api.store import audit as audit_store
from cogview_api.store.audit import AuditEntry as AuditEntry
from cogview_api.store.db import Database

CURSOR = "a"


def record(
    db: Database,
    *,
    actor: str,
    action: str,
    key_id: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    with db.write() as conn:
        audit_store.record(conn, actor=actor, action=action, key_id=key_id, detail=detail)


def audit_page(
    db: Database, *, actor: str, limit: int, cursor: str | None, key_id: str | None = None
) -> tuple[list[AuditEntry], str | None]:
    """One page of the log, newest first, and the next page's cursor (or None). The reading
    is itself logged, first (so it is on the page)."""
    paging.check_limit(limit)
    before = paging.decode_cursor(CURSOR, cursor) if cursor else None
    record(db, actor=actor, action="audit.read", key_id=key_id)
    with db.read() as conn:
        page = audit_store.page(conn, limit=limit + 1, before_id=before, key_id=key_id)
    if len(page) > limit:
        return page[:limit], paging.encode_cursor(CURSOR, page[limit - 1].id)
    return page, None
