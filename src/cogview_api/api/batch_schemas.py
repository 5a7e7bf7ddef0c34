"""Wire schemas of the batches API (docs/api.md "Batches"), named by role."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogview_api.addresses import check_syntax
from cogview_api.api.schemas import CreditsPublic, GenerationCreate

MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 512


class BatchFields(BaseModel):
    """Client -> server: a batch's own fields (its lines are read one by one, each with
    `GenerationCreate`, so that every bad line is reported with its index)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    callback_url: str | None = Field(
        default=None,
        description="http(s) URL that receives the batch object by POST when the batch ends "
        "(`batch.completed` or `batch.cancelled`), signed like a task's webhook.",
    )
    metadata: dict[str, str] | None = Field(
        default=None,
        description=f"Your own labels: at most {MAX_METADATA_PAIRS} pairs, keys of at most "
        f"{MAX_METADATA_KEY_CHARS} characters, values of at most {MAX_METADATA_VALUE_CHARS}.",
    )

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        return None if value is None else check_syntax(value)

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"metadata holds at most {MAX_METADATA_PAIRS} pairs")
        for k, v in value.items():
            if not 1 <= len(k) <= MAX_METADATA_KEY_CHARS:
                raise ValueError(f"metadata keys are 1 to {MAX_METADATA_KEY_CHARS} characters")
            if len(v) > MAX_METADATA_VALUE_CHARS:
                raise ValueError(
                    f"metadata values are at most {MAX_METADATA_VALUE_CHARS} characters"
                )
        return value


class BatchCreate(BatchFields):
    """Client -> server: the JSON body of POST /api/v1/batches."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "requests": [
                        {"model": "cogview-4", "prompt": "A red fox in snow", "size": "512*512"},
                        {"model": "cogview-4", "prompt": "A lighthouse at dusk", "n": 2},
                    ],
                    "metadata": {"campaign": "winter"},
                }
            ]
        },
    )

    requests: list[GenerationCreate] = Field(
        description="1..COGVIEW_BATCH_MAX_REQUESTS (default 10,000) bodies of "
        "POST /api/v1/images/generations, each with that route's fields, rules and defaults."
    )


class BatchCounts(BaseModel):
    queued: int
    running: int
    completed: int
    failed: int
    cancelled: int


class BatchImages(BaseModel):
    done: int
    total: int


class BatchPublic(BaseModel):
    """Server -> client: a batch as GET /api/v1/batches/{id} shows it."""

    batch_id: str
    object: Literal["batch"] = "batch"
    status: Literal["IN_PROGRESS", "COMPLETED", "CANCELLED"]
    total: int = Field(description="Tasks in the batch (its lines).")
    counts: BatchCounts
    images: BatchImages
    credits: CreditsPublic
    created_at: datetime
    finished_at: datetime | None
    callback_url: str | None
    metadata: dict[str, str] | None


class BatchList(BaseModel):
    batches: list[BatchPublic]
    next_cursor: str | None
    has_more: bool


class BatchWebhook(BaseModel):
    """Server -> receiver: the body of a batch's webhook."""

    type: Literal["batch.completed", "batch.cancelled"]
    timestamp: datetime
    data: BatchPublic
