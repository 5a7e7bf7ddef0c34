"""API keys and the credit ledger. Balances change only together with a ledger row."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Row, bindparam, func, insert, select, update

from cogview_api.clock import utcnow
from cogview_api.domain import ApiKey
from cogview_api.errors import InsufficientCredits, InvalidRequest, NotFound
from cogview_api.signing import new_secret
from cogview_api.store.notify import announce_change
from cogview_api.store.tables import api_keys, images, ledger, tasks

KEY_PREFIX = "cv4_"


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(conn: Connection, *, name: str, credits: int) -> tuple[ApiKey, str]:
    """Make a key; returns it and the secret, which is never stored and never shown again."""
    if credits < 0:
        raise InvalidRequest("credits must not be negative", param="credits")
    if credits > MAX_CREDITS:
        raise InvalidRequest(f"credits must be at most {MAX_CREDITS}", param="credits")
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key_id = "key_" + secrets.token_hex(8)
    now = utcnow()
    conn.execute(
        insert(api_keys).values(
            id=key_id,
            name=name,
            key_hash=hash_key(secret),
            prefix=secret[:10],
            balance=0,
            created_at=now,
            webhook_secret=new_secret(),
        )
    )
    if credits:
        add_credits(conn, key_id=key_id, amount=credits, kind="grant", note="initial credits")
    return get_key(conn, key_id), secret


def get_key(conn: Connection, key_id: str) -> ApiKey:
    row = conn.execute(select(api_keys).where(api_keys.c.id == key_id)).first()
    if row is None:
        raise NotFound(f"No key with id {key_id!r}.")
    return _key(row)


def webhook_secret(conn: Connection, key_id: str) -> str:
    """The key's webhook signing secret (`whsec_...`)."""
    secret = conn.execute(
        select(api_keys.c.webhook_secret).where(api_keys.c.id == key_id)
    ).scalar_one_or_none()
    if secret is None:
        raise NotFound(f"No key with id {key_id!r}.")
    return str(secret)


def rotate_webhook_secret(conn: Connection, key_id: str) -> str:
    """A new signing secret for the key; the old one stops signing at once. Returns the new one."""
    get_key(conn, key_id)
    secret = new_secret()
    conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(webhook_secret=secret))
    return secret


_KEY_BY_HASH = select(api_keys).where(api_keys.c.key_hash == bindparam("key_hash"))


def find_key_by_secret(conn: Connection, secret: str) -> ApiKey | None:
    # Lookup by a SHA-256 of the secret: the comparison never touches the secret itself,
    # so its timing says nothing about how much of a guess was right.
    row = conn.execute(_KEY_BY_HASH, {"key_hash": hash_key(secret)}).first()
    return None if row is None else _key(row)


def list_keys(conn: Connection) -> list[ApiKey]:
    return [_key(r) for r in conn.execute(select(api_keys).order_by(api_keys.c.created_at))]


def revoke_key(conn: Connection, key_id: str) -> ApiKey:
    get_key(conn, key_id)
    conn.execute(
        update(api_keys)
        .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    announce_change(conn)  # API processes end the key's open streams and waits
    return get_key(conn, key_id)


def set_limits(conn: Connection, key_id: str, values: Mapping[str, object]) -> ApiKey:
    """Set the key's own limits named in `values` (None: back to the settings'); returns it."""
    if conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(**values)).rowcount != 1:
        raise NotFound(f"No key with id {key_id!r}.")
    return get_key(conn, key_id)


# The most credits a grant may bring a key to, and so the most one may move. Far below 2^63 - 1:
# `balance + amount` of such values cannot overflow the 64-bit column, where SQLite would
# silently turn the balance into a float (and PostgreSQL refuse it). A refund is never refused:
# it may take a balance past this by the price of one task.
MAX_CREDITS = 10**15

# Every submit moves credits: built once (building them cost more than running them).
_new_balance = api_keys.c.balance + bindparam("amount")
_MOVE_CREDITS = (
    update(api_keys)
    .where(api_keys.c.id == bindparam("key_id"), _new_balance >= 0)
    .values(balance=_new_balance)
)
_GRANT_CREDITS = _MOVE_CREDITS.where(_new_balance <= MAX_CREDITS)
_INSERT_LEDGER = insert(ledger)


def add_credits(
    conn: Connection,
    *,
    key_id: str,
    amount: int,
    kind: str,
    task_id: str | None = None,
    note: str | None = None,
) -> None:
    """Move credits by `amount` (signed). Raises InsufficientCredits rather than go below zero,
    InvalidRequest rather than go past MAX_CREDITS, NotFound for an unknown key."""
    if abs(amount) > MAX_CREDITS:
        raise InvalidRequest(f"amount must be at most {MAX_CREDITS} credits", param="amount")
    # Any move upwards (a grant, a positive adjustment, a refund) is held to MAX_CREDITS: past
    # 2^63 - 1 SQLite turns the balance into a float. A refund only returns what was reserved.
    grant = amount > 0 and kind != "refund"
    result = conn.execute(
        _GRANT_CREDITS if grant else _MOVE_CREDITS, {"key_id": key_id, "amount": amount}
    )
    if result.rowcount != 1:
        balance = get_key(conn, key_id).balance  # NotFound for an unknown key
        if grant:
            raise InvalidRequest(
                f"A key holds at most {MAX_CREDITS} credits; this would pass it.", param="amount"
            )
        if kind == "reserve":
            raise InsufficientCredits(
                f"Insufficient credits: this request costs {-amount} credits and the key's "
                f"balance is {balance}."
            )
        raise InsufficientCredits(
            f"Insufficient credits: the key's balance is {balance}; taking {-amount} would "
            "go below zero."
        )
    conn.execute(
        _INSERT_LEDGER,
        {
            "key_id": key_id,
            "kind": kind,
            "amount": amount,
            "task_id": task_id,
            "note": note,
            "created_at": utcnow(),
        },
    )


def move_credits_per_task(
    conn: Connection, *, key_id: str, kind: str, amounts: Sequence[tuple[str, int]], what: str
) -> None:
    """Reserve (`amounts` negative) or refund (positive) credits for many tasks at once: one
    balance update for their sum, one ledger row per task (so every credit still traces to its
    task) written by one executemany. A reserve that would take the balance below zero raises
    InsufficientCredits naming `what` it was for, its cost and the balance; nothing is written.
    """
    total = sum(amount for _, amount in amounts)
    if not amounts:
        return
    result = conn.execute(_MOVE_CREDITS, {"key_id": key_id, "amount": total})
    if result.rowcount != 1:
        balance = get_key(conn, key_id).balance  # NotFound for an unknown key
        raise InsufficientCredits(
            f"Insufficient credits: {what} needs {-total} credits and the key's balance is "
            f"{balance}."
        )
    now = utcnow()
    rows = [
        {
            "key_id": key_id,
            "kind": kind,
            "amount": amount,
            "task_id": task_id,
            "note": None,
            "created_at": now,
        }
        for task_id, amount in amounts
        if amount
    ]
    if rows:
        conn.execute(_INSERT_LEDGER, rows)


def account_totals(conn: Connection, key_id: str) -> tuple[int, int]:
    """(images generated, credits spent net of refunds) for one key."""
    spent = conn.execute(
        select(func.coalesce(func.sum(ledger.c.amount), 0)).where(
            ledger.c.key_id == key_id, ledger.c.kind.in_(("reserve", "refund"))
        )
    ).scalar_one()
    generated = conn.execute(
        select(func.count())
        .select_from(images.join(tasks, images.c.task_id == tasks.c.id))
        .where(tasks.c.key_id == key_id)
    ).scalar_one()
    return int(generated), -int(spent)


def ledger_sum(conn: Connection, key_id: str) -> int:
    return int(
        conn.execute(
            select(func.coalesce(func.sum(ledger.c.amount), 0)).where(ledger.c.key_id == key_id)
        ).scalar_one()
    )


def _key(row: Row[Any]) -> ApiKey:
    return key_from(row._mapping)


def key_from(m: Mapping[Any, Any]) -> ApiKey:
    """The key of a row of `api_keys`, by column name."""
    return ApiKey(
        id=m["id"],
        name=m["name"],
        prefix=m["prefix"],
        balance=int(m["balance"]),
        created_at=m["created_at"],
        revoked_at=m["revoked_at"],
        credits_spent=int(m["credits_spent"]),
        images_generated=int(m["images_generated"]),
        submit_rate=m["submit_rate"],
        submit_burst=m["submit_burst"],
        max_waiting=m["max_waiting"],
        max_streams=m["max_streams"],
        max_waits=m["max_waits"],
    )
