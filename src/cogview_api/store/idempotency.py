"""Idempotency-Key records: which task a (API key, Idempotency-Key) pair created, and for which
request, so a retry gets that task instead of a second one (and a second charge).

The submit transaction claims the key first (`claim`: an INSERT with no task yet), then reserves
credits and inserts the task, then `attach`es the task: one transaction, all or nothing. Two
retries racing on one key therefore meet on the primary key before either reserves credits:
- SQLite: writers are serialized (BEGIN IMMEDIATE), so the second one simply finds the row.
- PostgreSQL: the second INSERT waits for the first transaction; if that commits, the INSERT
  fails with a unique violation, raised here as `KeyClaimedMeanwhile`: the caller rolls back and
  reads the winner's row (`find`) in a new transaction.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from cogview_api.clock import utcnow
from cogview_api.store.tables import idempotency_keys

# How long a key stands for its first request (24 h, docs/api.md `Idempotency-Key`). Older rows
# are expired: reusing their key creates a new task, and `claim` deletes them.
KEY_TTL = timedelta(hours=24)

# SQLSTATE of a unique violation (PostgreSQL), and SQLite's message for one.
_UNIQUE_VIOLATION = "23505"
_SQLITE_UNIQUE = "UNIQUE constraint failed"


class KeyClaimedMeanwhile(Exception):
    """Another transaction claimed this Idempotency-Key and committed while ours ran.
    Our transaction is now unusable (PostgreSQL aborts it): roll back, then `find` the row."""


@dataclass(frozen=True)
class IdempotencyRecord:
    request_hash: str
    task_id: str | None
    created_at: datetime
    batch_id: str | None = None  # the batch, for a POST /api/v1/batches


def find(
    conn: Connection, *, key_id: str, idem_key: str, now: datetime | None = None
) -> IdempotencyRecord | None:
    """The live (under KEY_TTL old) record of this key, or None."""
    cutoff = (now or utcnow()) - KEY_TTL
    row = conn.execute(
        select(
            idempotency_keys.c.request_hash,
            idempotency_keys.c.task_id,
            idempotency_keys.c.created_at,
            idempotency_keys.c.batch_id,
        ).where(
            idempotency_keys.c.key_id == key_id,
            idempotency_keys.c.idem_key == idem_key,
            idempotency_keys.c.created_at > cutoff,
        )
    ).first()
    if row is None:
        return None
    return IdempotencyRecord(row.request_hash, row.task_id, row.created_at, row.batch_id)


def claim(conn: Connection, *, key_id: str, idem_key: str, request_hash: str) -> None:
    """Insert the record for a new request, with no task yet, after deleting this API key's
    expired records (which frees `idem_key` if its old record expired: the purge rides on the
    inserts, so no separate job is needed and each delete is a small range of one key).

    Raises KeyClaimedMeanwhile if a concurrent transaction committed the same key first.
    """
    now = utcnow()
    conn.execute(
        delete(idempotency_keys).where(
            idempotency_keys.c.key_id == key_id, idempotency_keys.c.created_at <= now - KEY_TTL
        )
    )
    try:
        # A savepoint would let the transaction go on after the violation, but there is
        # nothing to go on with: the answer is the other request's task.
        conn.execute(
            insert(idempotency_keys).values(
                key_id=key_id,
                idem_key=idem_key,
                request_hash=request_hash,
                task_id=None,
                created_at=now,
            )
        )
    except IntegrityError as exc:
        if _is_unique_violation(exc):
            raise KeyClaimedMeanwhile(idem_key) from exc
        raise


def attach(conn: Connection, *, key_id: str, idem_key: str, task_id: str) -> None:
    """Record the task that the claimed key's request created (same transaction as `claim`)."""
    conn.execute(
        update(idempotency_keys)
        .where(idempotency_keys.c.key_id == key_id, idempotency_keys.c.idem_key == idem_key)
        .values(task_id=task_id)
    )


def attach_batch(conn: Connection, *, key_id: str, idem_key: str, batch_id: str) -> None:
    """Record the batch that the claimed key's request created (same transaction as `claim`)."""
    conn.execute(
        update(idempotency_keys)
        .where(idempotency_keys.c.key_id == key_id, idempotency_keys.c.idem_key == idem_key)
        .values(batch_id=batch_id)
    )


def _is_unique_violation(exc: IntegrityError) -> bool:
    orig = exc.orig
    if getattr(orig, "sqlstate", None) == _UNIQUE_VIOLATION:
        return True
    return str(orig).startswith(_SQLITE_UNIQUE)
