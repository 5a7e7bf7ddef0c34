"""Typed results: pydantic models of what the native API answers (`data` of its envelope).

They are frozen and ignore fields they do not know, so a newer server with more fields does not
break an older client. Status values are the server's strings (`IN_PROGRESS`, `COMPLETED`,
`FAILED`, `CANCELLED`); each model says whether it has ended (`done`)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

TASK_TERMINAL = frozenset({"COMPLETED", "FAILED", "CANCELLED"})
BATCH_TERMINAL = frozenset({"COMPLETED", "CANCELLED"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class GenerationRequest(_Model):
    """The body of one generation (`POST /api/v1/images/generations`, or one line of a batch).
    Only the fields you set are sent, so the server's defaults apply to the rest (and an
    Idempotency-Key retry sends exactly the same body)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str
    model: str = "cogview-4"
    size: str | None = None
    quality: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    n: int | None = None
    output_format: str | None = None
    user_id: str | None = None
    callback_url: str | None = None
    previews: int | None = None  # partial previews of the first image while it forms, 0..3

    def body(self) -> dict[str, Any]:
        """The JSON body: `model` and `prompt`, and every other field that is not None."""
        return self.model_dump(exclude_none=True)


class Image(_Model):
    url: str
    width: int
    height: int
    seed: int
    format: str


class Preview(_Model):
    """A partial preview of a task's first image, decoded after denoising step `step`."""

    index: int
    step: int
    url: str


class Progress(_Model):
    stage: str
    percent: int
    step: int = 0
    total_steps: int = 0
    queue_position: int | None = None


class TaskRequest(_Model):
    prompt: str
    negative_prompt: str = ""
    size: str
    quality: str
    n: int
    seed: int | None = None
    output_format: str
    user_id: str | None = None


class Credits(_Model):
    charged: int
    refunded: int


class ErrorInfo(_Model):
    code: int | str
    message: str
    type: str | None = None
    param: str | None = None


class Task(_Model):
    """A task as `GET /api/v1/tasks/{id}` gives it."""

    task_id: str
    model: str
    status: str
    created_at: datetime
    started_at: datetime | None = None
    completed_at: datetime | None = None
    expires_at: datetime | None = None
    request: TaskRequest
    progress: Progress
    images: list[Image] = Field(default_factory=list)
    credits: Credits
    error: ErrorInfo | None = None
    batch_id: str | None = None
    batch_index: int | None = None
    previews: list[Preview] | None = None  # only on a task that asked for previews

    @property
    def done(self) -> bool:
        """Whether the task has ended (COMPLETED, FAILED or CANCELLED): it never changes again."""
        return self.status.upper() in TASK_TERMINAL

    @property
    def ok(self) -> bool:
        return self.status.upper() == "COMPLETED"


class Submitted(_Model):
    """The answer to a submit: the task's id, and what it cost."""

    task_id: str
    status: str
    created_at: datetime
    credits_charged: int
    queue_position: int | None = None
    # True when the server answered a retry with the task it had already made (nothing charged).
    replayed: bool = False


class TaskPage(_Model):
    tasks: list[Task]
    next_cursor: str | None = None
    has_more: bool = False


class BatchCounts(_Model):
    queued: int = 0
    running: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0

    @property
    def ended(self) -> int:
        return self.completed + self.failed + self.cancelled


class BatchImages(_Model):
    done: int
    total: int


class Batch(_Model):
    """A batch as `GET /api/v1/batches/{id}` gives it."""

    batch_id: str
    object: str = "batch"
    status: str
    total: int
    counts: BatchCounts
    images: BatchImages
    credits: Credits
    created_at: datetime
    finished_at: datetime | None = None
    callback_url: str | None = None
    metadata: dict[str, str] | None = None
    replayed: bool = False

    @property
    def done(self) -> bool:
        """Whether every task of the batch has ended (COMPLETED or CANCELLED)."""
        return self.status.upper() in BATCH_TERMINAL


class BatchPage(_Model):
    batches: list[Batch]
    next_cursor: str | None = None
    has_more: bool = False


class Account(_Model):
    key_id: str
    name: str
    balance: int
    images_generated: int
    credits_spent: int


class ServerInfo(_Model):
    """`GET /api/v1/info`: the server's model, prices and size rules (no key needed)."""

    version: str
    models: list[str]
    engine: str | None = None
    note: str | None = None
    credits_per_image: dict[str, int]
    default_quality: str = "hd"
    max_prompt_chars: int = 1000
    max_images_per_request: int = 4

    def price(self, quality: str | None, n: int | None) -> int:
        """Credits a request of this quality and image count costs."""
        return self.credits_per_image[(quality or self.default_quality).lower()] * (n or 1)
