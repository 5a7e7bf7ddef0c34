"""Held slots of the per-key caps on open event streams and `Prefer: wait` requests: a row per
open request, shared by every API process (services/follow_limits.py holds the rules)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import ApiKey
from cogview_api.store.keys import hash_key, key_from
from cogview_api.store.tables import api_keys, follow_slots

# The key of a bearer secret, its row locked (PostgreSQL) so two processes taking its last slot
# at once count one after the other; SQLite's write transaction is already one at a time.
_KEY_FOR_UPDATE = (
    select(api_keys).where(api_keys.c.key_hash == bindparam("key_hash")).with_for_update()
)
_LAPSED = delete(follow_slots).where(
    follow_slots.c.key_id == bindparam("key_id"), follow_slots.c.expires_at < bindparam("now")
)
_HELD = (
    select(func.count())
    .select_from(follow_slots)
    .where(follow_slots.c.key_id == bindparam("key_id"), follow_slots.c.kind == bindparam("kind"))
)


def lock_key(conn: Connection, secret: str) -> ApiKey | None:
    row = conn.execute(_KEY_FOR_UPDATE, {"key_hash": hash_key(secret)}).first()
    return None if row is None else key_from(row._mapping)


def held(conn: Connection, *, key_id: str, kind: str) -> int:
    """The key's live slots of `kind` (its lapsed ones, of any kind, deleted first)."""
    conn.execute(_LAPSED, {"key_id": key_id, "now": utcnow()})
    return int(conn.execute(_HELD, {"key_id": key_id, "kind": kind}).scalar_one())


def take(conn: Connection, *, key_id: str, kind: str, holder: str, lease: timedelta) -> str:
    slot_id = secrets.token_hex(16)
    conn.execute(
        insert(follow_slots).values(
            id=slot_id, key_id=key_id, kind=kind, holder=holder, expires_at=utcnow() + lease
        )
    )
    return slot_id


def release(conn: Connection, slot_id: str) -> None:
    conn.execute(delete(follow_slots).where(follow_slots.c.id == slot_id))


def renew(conn: Connection, slot_ids: Sequence[str], *, lease: timedelta) -> int:
    """Extend the lease of the slots `slot_ids` (those a process still holds); how many."""
    result = conn.execute(
        update(follow_slots)
        .where(follow_slots.c.id.in_(slot_ids))
        .values(expires_at=utcnow() + lease)
    )
    return int(result.rowcount)
