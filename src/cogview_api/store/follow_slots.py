"""Held slots of the per-key caps on open event streams and `Prefer: wait` requests: a row per
open request, shared by every API process (services/follow_limits.py holds the rules)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, bindparam, delete, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import ApiKey
from cogview_api.errors import NotFound
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


@dataclass(frozen=True)
class OwnCaps:
    """A key's own caps; None: the settings' default."""

    max_streams: int | None
    max_waits: int | None


def lock_key(conn: Connection, secret: str) -> tuple[ApiKey, OwnCaps] | None:
    row = conn.execute(_KEY_FOR_UPDATE, {"key_hash": hash_key(secret)}).first()
    if row is None:
        return None
    return key_from(row._mapping), OwnCaps(max_streams=row.max_streams, max_waits=row.max_waits)


def own_caps(conn: Connection, key_id: str) -> OwnCaps:
    row = conn.execute(
        select(api_keys.c.max_streams, api_keys.c.max_waits).where(api_keys.c.id == key_id)
    ).first()
    if row is None:
        raise NotFound(f"No API key with id {key_id!r}.")
    return OwnCaps(max_streams=row.max_streams, max_waits=row.max_waits)


def set_own_caps(conn: Connection, key_id: str, caps: OwnCaps) -> None:
    own_caps(conn, key_id)  # NotFound first
    conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id)
        .values(max_streams=caps.max_streams, max_waits=caps.max_waits)
    )


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


def renew(conn: Connection, *, holder: str, lease: timedelta) -> int:
    """Extend the lease of every slot `holder` holds; how many."""
    result = conn.execute(
        update(follow_slots)
        .where(follow_slots.c.holder == holder)
        .values(expires_at=utcnow() + lease)
    )
    return int(result.rowcount)
