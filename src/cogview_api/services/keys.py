"""Use cases around keys and credits: authenticate, create, list, revoke, grant, account.

The operator's actions (create, revoke, rotate, grant, adjust) are shared by the CLI and the
admin API. Given an `actor` (the admin token's name, or `cli:<user>`), each writes its audit row
in the action's own transaction: an action happened if and only if its row is there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection

from cogview_api.domain import ApiKey
from cogview_api.errors import (
    AuthenticationFailed,
    InsufficientCredits,
    InvalidRequest,
    PermissionDenied,
)
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import audit as audit_store
from cogview_api.store import keys as key_store
from cogview_api.store import tasks as task_store
from cogview_api.store import usage as usage_store
from cogview_api.store.db import Database

# The widths of `api_keys.name` and `ledger.note`: PostgreSQL refuses longer text.
MAX_NAME_CHARS = 200
MAX_NOTE_CHARS = 200


def authenticate(db: Database, secret: str | None) -> ApiKey:
    with db.read() as conn:
        return authenticate_in(conn, secret)


def authenticate_in(conn: Connection, secret: str | None) -> ApiKey:
    """The key of a bearer secret, read in the caller's transaction, so a request that reads
    checks its key and reads its data in one: a revoked key is refused on its next request.
    Raises AuthenticationFailed (no or unknown secret) or PermissionDenied (revoked)."""
    if not secret:
        raise AuthenticationFailed()
    return usable_key(key_store.find_key_by_secret(conn, secret))


def usable_key(key: ApiKey | None) -> ApiKey:
    """The key found for a bearer secret, if it may be used. Raises AuthenticationFailed (no
    such key) or PermissionDenied (revoked)."""
    if key is None:
        raise AuthenticationFailed()
    if key.revoked_at is not None:
        raise PermissionDenied("This API key has been revoked.")
    return key


def _audit(
    conn: Connection,
    actor: str | None,
    action: str,
    key_id: str | None,
    detail: dict[str, Any] | None = None,
) -> None:
    if actor is not None:
        audit_store.record(conn, actor=actor, action=action, key_id=key_id, detail=detail)


def create_key(
    db: Database, *, name: str, credits: int, actor: str | None = None
) -> tuple[ApiKey, str]:
    """A new key and its secret (shown once); `credits` as a first `grant` ledger row."""
    if not name.strip():
        raise InvalidRequest("name must not be empty", param="name")
    if len(name.strip()) > MAX_NAME_CHARS:
        raise InvalidRequest(f"name must be at most {MAX_NAME_CHARS} characters", param="name")
    refuse_unstorable_text(name=name)
    with db.write() as conn:
        key, secret = key_store.create_key(conn, name=name.strip(), credits=credits)
        _audit(conn, actor, "keys.create", key.id, {"name": key.name, "credits": credits})
        return key, secret


def get_key(db: Database, key_id: str, *, actor: str | None = None) -> ApiKey:
    """NotFound for an unknown key."""
    if actor is None:
        with db.read() as conn:
            return key_store.get_key(conn, key_id)
    with db.write() as conn:
        key = key_store.get_key(conn, key_id)
        _audit(conn, actor, "keys.get", key_id)
        return key


def is_api_key(db: Database, secret: str) -> bool:
    """Whether `secret` is some key's (revoked or not)."""
    with db.read() as conn:
        return key_store.find_key_by_secret(conn, secret) is not None


def webhook_secret(db: Database, key_id: str) -> str:
    with db.read() as conn:
        return key_store.webhook_secret(conn, key_id)


def rotate_webhook_secret(db: Database, key_id: str, *, actor: str | None = None) -> str:
    with db.write() as conn:
        secret = key_store.rotate_webhook_secret(conn, key_id)
        _audit(conn, actor, "keys.rotate_webhook_secret", key_id)
        return secret


def list_keys(db: Database, *, actor: str | None = None) -> list[ApiKey]:
    """Every key, oldest first."""
    if actor is None:
        with db.read() as conn:
            return key_store.list_keys(conn)
    with db.write() as conn:
        _audit(conn, actor, "keys.list", None)
        return key_store.list_keys(conn)


REVOKED_MESSAGE = "Cancelled: its API key was revoked; credits refunded."


def revoke_key(db: Database, key_id: str, *, actor: str | None = None) -> ApiKey:
    """Revoke the key and, in the same transaction, cancel its waiting and running tasks with a
    refund: nothing more runs or is charged for a key that may no longer be used (a running
    task's worker stops at its next step). Its open streams and waits end at their next read,
    which checks the key. Returns the key, revoked. Revoking a revoked key changes nothing."""
    with db.write() as conn:
        key = key_store.revoke_key(conn, key_id)
        cancelled = task_store.live_task_ids(conn, key_id=key.id)
        for task_id in cancelled:
            task_store.cancel_task(conn, task_id=task_id, message=REVOKED_MESSAGE)
        _audit(conn, actor, "keys.revoke", key.id, {"tasks_cancelled": len(cancelled)})
        return key_store.get_key(conn, key_id) if cancelled else key  # with the refunds


CreditKind = Literal["grant", "adjust"]


@dataclass(frozen=True)
class CreditMove:
    """A key after a grant or an adjustment, and the ledger row that made it."""

    key: ApiKey
    entry: usage_store.LedgerRow


def move_credits(
    db: Database,
    *,
    key_id: str,
    amount: int,
    kind: CreditKind,
    note: str | None = None,
    actor: str | None = None,
) -> CreditMove:
    """A ledger row, never an overwrite: a `grant` adds (amount > 0); an `adjust` corrects
    either way (amount != 0) but never below zero. InvalidRequest for a bad amount or note,
    NotFound for an unknown key."""
    if kind == "grant" and amount <= 0:
        raise InvalidRequest("amount of a grant must be positive", param="amount")
    if amount == 0:
        raise InvalidRequest("amount must not be zero", param="amount")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(f"note must be at most {MAX_NOTE_CHARS} characters", param="note")
    refuse_unstorable_text(note=note)
    try:
        with db.write() as conn:
            key_store.add_credits(conn, key_id=key_id, amount=amount, kind=kind, note=note)
            # The key's row stays locked by the balance update until this commits (and SQLite
            # has one writer): the key's newest ledger row is this one.
            (entry,) = usage_store.ledger_page(conn, key_id=key_id, limit=1)
            _audit(conn, actor, f"credits.{kind}", key_id, {"amount": amount, "note": note})
            return CreditMove(key=key_store.get_key(conn, key_id), entry=entry)
    except InsufficientCredits as exc:
        raise InvalidRequest(
            f"Insufficient credits: the key has fewer than {-amount}, and an adjustment never "
            "takes a balance below zero.",
            param="amount",
        ) from exc


def grant_credits(
    db: Database, *, key_id: str, amount: int, note: str | None = None, actor: str | None = None
) -> ApiKey:
    """A ledger entry, never an overwrite: a positive amount is a grant, a negative one an
    adjustment downwards."""
    kind: CreditKind = "grant" if amount > 0 else "adjust"
    return move_credits(db, key_id=key_id, amount=amount, kind=kind, note=note, actor=actor).key


@dataclass(frozen=True)
class Account:
    key: ApiKey
    images_generated: int
    credits_spent: int


def account_for(db: Database, secret: str | None) -> Account:
    """The account of a bearer secret's key: authenticated and read in one transaction."""
    with db.read() as conn:
        key = authenticate_in(conn, secret)
    # The totals came with the key's row (kept by triggers; key_store.account_totals sums
    # the same from the ledger and the images).
    return Account(key=key, images_generated=key.images_generated, credits_spent=key.credits_spent)
