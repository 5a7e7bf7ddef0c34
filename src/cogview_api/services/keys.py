"""Use cases around keys and credits: authenticate, create, list, revoke, grant, account."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection

from cogview_api.domain import ApiKey
from cogview_api.errors import AuthenticationFailed, InvalidRequest, PermissionDenied
from cogview_api.services.text import refuse_unstorable_text
from cogview_api.store import keys as key_store
from cogview_api.store import tasks as task_store
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


def create_key(db: Database, *, name: str, credits: int) -> tuple[ApiKey, str]:
    if not name.strip():
        raise InvalidRequest("name must not be empty", param="name")
    if len(name.strip()) > MAX_NAME_CHARS:
        raise InvalidRequest(f"name must be at most {MAX_NAME_CHARS} characters", param="name")
    refuse_unstorable_text(name=name)
    with db.write() as conn:
        return key_store.create_key(conn, name=name.strip(), credits=credits)


def webhook_secret(db: Database, key_id: str) -> str:
    with db.read() as conn:
        return key_store.webhook_secret(conn, key_id)


def rotate_webhook_secret(db: Database, key_id: str) -> str:
    with db.write() as conn:
        return key_store.rotate_webhook_secret(conn, key_id)


def list_keys(db: Database) -> list[ApiKey]:
    with db.read() as conn:
        return key_store.list_keys(conn)


REVOKED_MESSAGE = "Cancelled: its API key was revoked; credits refunded."


def revoke_key(db: Database, key_id: str) -> ApiKey:
    """Revoke the key and, in the same transaction, cancel its waiting and running tasks with a
    refund: nothing more runs or is charged for a key that may no longer be used (a running
    task's worker stops at its next step). Its open streams and waits end at their next read,
    which checks the key. Returns the key, revoked."""
    with db.write() as conn:
        key = key_store.revoke_key(conn, key_id)
        for task_id in task_store.live_task_ids(conn, key_id=key.id):
            task_store.cancel_task(conn, task_id=task_id, message=REVOKED_MESSAGE)
        return key


def grant_credits(db: Database, *, key_id: str, amount: int, note: str | None = None) -> ApiKey:
    """A ledger entry, never an overwrite. A negative amount is an adjustment downwards."""
    if amount == 0:
        raise InvalidRequest("amount must not be zero", param="amount")
    if note is not None and len(note) > MAX_NOTE_CHARS:
        raise InvalidRequest(f"note must be at most {MAX_NOTE_CHARS} characters", param="note")
    refuse_unstorable_text(note=note)
    with db.write() as conn:
        key_store.add_credits(
            conn,
            key_id=key_id,
            amount=amount,
            kind="grant" if amount > 0 else "adjust",
            note=note,
        )
        return key_store.get_key(conn, key_id)


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
