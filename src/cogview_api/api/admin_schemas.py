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


class KeyLimitsChange(BaseModel):
    """Admin -> server: the body of PUT /admin/v1/keys/{id}/limits. The values given become the
    key's own (the others keep theirs); `reset: true` drops all of them (the settings' again).
    The ranges are checked by services/limits.py, as for `cogview-api keys limits`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    submit_rate: float | None = Field(
        default=None,
        description="Submits per second; 0 = no submit rate limit.",
        json_schema_extra={"minimum": 0, "maximum": 1_000_000},
    )
    submit_burst: int | None = Field(
        default=None,
        description="Submits at once after a quiet spell.",
        json_schema_extra={"minimum": 1, "maximum": 1_000_000},
    )
    max_waiting: int | None = Field(
        default=None,
        description="Tasks of the key waiting at once.",
        json_schema_extra={"minimum": 1, "maximum": 2**31 - 1},
    )
    max_streams: int | None = Field(
        default=None,
        description="Task event streams of the key open at once.",
        json_schema_extra={"minimum": 1, "maximum": 100_000},
    )
    max_waits: int | None = Field(
        default=None,
        description="`Prefer: wait` submits of the key waiting at once.",
        json_schema_extra={"minimum": 1, "maximum": 100_000},
    )
    reset: bool = Field(default=False, description="Drop the key's own limits.")


class KeyLimitsPublic(BaseModel):
    """Server -> admin: a key's limits in effect; `own` names those that are the key's own
    (the others are the server's settings)."""

    key_id: str
    submit_rate: float
    submit_burst: int
    max_waiting: int
    max_streams: int
    max_waits: int
    own: list[str]


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
