"""Wire schemas of the admin API (/admin/v1), named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from cogview_api.api.schemas import LedgerEntryPublic

# The bounds the services check too; in the schema so /docs shows them.
MAX_NAME_CHARS = 200
MAX_NOTE_CHARS = 200
MAX_CREDITS = 10**15


class KeyCreate(BaseModel):
    """Admin -> server: the body of POST /admin/v1/keys."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    credits: int = Field(default=0, ge=0, le=MAX_CREDITS, description="A first `grant`.")


class CreditChange(BaseModel):
    """Admin -> server: the body of a grant (amount > 0) or an adjustment (amount != 0)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    amount: int = Field(ge=-MAX_CREDITS, le=MAX_CREDITS)
    note: str | None = Field(default=None, max_length=MAX_NOTE_CHARS)


class KeyAdmin(BaseModel):
    """Server -> admin: a key as the operator sees it (never its secret)."""

    id: str
    name: str
    prefix: str
    balance: int
    created_at: datetime
    revoked_at: datetime | None
    revoked: bool
    images_generated: int
    credits_spent: int


class KeyCreated(KeyAdmin):
    """Server -> admin: a new key with its secret and webhook signing secret, shown this once."""

    key: str
    webhook_secret: str


class KeyList(BaseModel):
    keys: list[KeyAdmin]


class WebhookSecretRotated(BaseModel):
    key_id: str
    webhook_secret: str


class CreditMoved(BaseModel):
    """Server -> admin: the key after the move, and the ledger row that made it."""

    key: KeyAdmin
    entry: LedgerEntryPublic


class AuditEntryPublic(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    key_id: str | None
    detail: dict[str, Any]


class AuditPage(BaseModel):
    entries: list[AuditEntryPublic]
    next_cursor: str | None
    has_more: bool
