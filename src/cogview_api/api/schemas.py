"""Wire schemas of the native API, named by role. Separate from the domain types."""

from __future__ import annotations

from datetime import date as date_
from datetime import datetime
from typing import Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from cogview_api.addresses import check_syntax
from cogview_api.api.inputs import (
    DeliveryStateName,
    OutputFormatName,
    QualityName,
    StageName,
    WebhookEventName,
    check_model,
    clean_prompt,
)
from cogview_api.domain import (
    MAX_IMAGES_PER_REQUEST,
    MAX_PREVIEWS,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_USER_ID_CHARS,
    MODEL_NAMES,
    GenerationRequest,
    OutputFormat,
    Quality,
    WireStatus,
    parse_size,
)


class GenerationCreate(BaseModel):
    """Client -> server: the body of POST /api/v1/images/generations."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "examples": [
                {
                    "model": "cogview-4",
                    "prompt": "A futuristic robot assistant helping in a modern kitchen, "
                    "clean design",
                    "size": "1024*1024",
                    "quality": "hd",
                }
            ]
        },
    )

    # The schema's `enum` and `pattern` describe the rules; the validators below enforce them,
    # with this API's own error messages.
    model: str = Field(
        description="`cogview-4` or `cogview-4-250304`.",
        json_schema_extra={"enum": list(MODEL_NAMES)},
    )
    prompt: str = Field(
        description="1..1000 characters after trimming.", json_schema_extra={"pattern": r"\S"}
    )
    size: str = Field(
        default="1024*1024",
        description="`W*H` or `WxH`: a preset, or 512..2048 per side, divisible by 16, "
        "at most 2^21 pixels.",
    )
    quality: QualityName = Quality.HD
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    n: int = Field(default=1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    output_format: OutputFormatName = OutputFormat.PNG
    callback_url: str | None = Field(
        default=None,
        description="http(s) URL that receives the terminal task object by POST, signed with "
        "the Standard Webhooks scheme. Loopback, private and link-local targets are refused "
        "unless the operator allows them.",
    )
    user_id: str | None = Field(default=None, max_length=MAX_USER_ID_CHARS)
    previews: int = Field(
        default=0,
        ge=0,
        le=MAX_PREVIEWS,
        description="Partial previews of the first image to decode while it forms, 0..3 "
        "(evenly spaced over the steps; WebP at the task's size). They appear in the task's "
        "`previews` as they are made. Free.",
    )

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_model(value)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        return clean_prompt(value)

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        return str(parse_size(value))

    @field_validator("callback_url")
    @classmethod
    def _callback(cls, value: str | None) -> str | None:
        # The shape here; where it resolves to is checked off the event loop, at submit.
        return None if value is None else check_syntax(value)

    def to_domain(self) -> GenerationRequest:
        return GenerationRequest(
            model=self.model,
            prompt=self.prompt,
            size=parse_size(self.size),
            quality=self.quality,
            n=self.n,
            negative_prompt=self.negative_prompt,
            seed=self.seed,
            output_format=self.output_format,
            user_id=self.user_id,
            callback_url=self.callback_url,
            previews=self.previews,
        )


class ImagePublic(BaseModel):
    url: str
    width: int
    height: int
    seed: int
    format: str


class PreviewPublic(BaseModel):
    """A partial preview of the task's first image, decoded after denoising step `step`."""

    index: int = Field(description="0.. in the order made.")
    step: int
    url: str = Field(description="WebP at the task's size; no key needed, expires with the task.")


class ProgressPublic(BaseModel):
    stage: StageName
    percent: int
    step: int
    total_steps: int
    queue_position: int | None = None


class RequestPublic(BaseModel):
    prompt: str
    negative_prompt: str
    size: str
    quality: str
    n: int
    seed: int | None
    output_format: str
    user_id: str | None


class CreditsPublic(BaseModel):
    charged: int
    refunded: int


class ErrorDetail(BaseModel):
    code: int
    message: str
    type: str
    param: str | None = None


class WebhookAttemptPublic(BaseModel):
    number: int
    at: datetime
    status_code: int | None = Field(description="The receiver's answer; null if none came.")
    error: str | None = Field(description="Why there was no answer (timeout, refused, ...).")


class WebhookPublic(BaseModel):
    """The delivery of the task's callback_url, once the task has settled."""

    id: str = Field(description="The `webhook-id` header, the same on every attempt.")
    event: WebhookEventName
    status: DeliveryStateName
    attempts: list[WebhookAttemptPublic]
    next_attempt_at: datetime | None


class TaskPublic(BaseModel):
    """Server -> client: a task as GET /api/v1/tasks/{id} shows it."""

    task_id: str
    model: str
    status: WireStatus
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    request: RequestPublic
    progress: ProgressPublic
    images: list[ImagePublic]
    credits: CreditsPublic
    error: ErrorDetail | None
    webhook: WebhookPublic | None = Field(
        default=None, description="Deliveries to callback_url; not part of the webhook payload."
    )
    # Only on a batch's task (left out of every other task's object).
    batch_id: str | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="The batch this task is a line of (POST /api/v1/batches); absent otherwise.",
    )
    batch_index: int | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Its line in that batch, 0-based; absent for a task submitted alone.",
    )
    # Only on a task that asked for previews (left out of every other task's object).
    previews: list[PreviewPublic] | None = Field(
        default=None,
        exclude_if=lambda v: v is None,
        description="Partial previews made so far, by index; absent on a task that asked for none.",
    )


class TaskCreated(BaseModel):
    """Server -> client: the creation answer (the hosted API's shape, plus extensions)."""

    task_id: str
    status: WireStatus
    created_at: datetime
    credits_charged: int
    queue_position: int | None


class TaskList(BaseModel):
    tasks: list[TaskPublic]
    next_cursor: str | None
    has_more: bool


class AccountPublic(BaseModel):
    key_id: str
    name: str
    balance: int
    images_generated: int
    credits_spent: int


DataT = TypeVar("DataT")


class Envelope(BaseModel, Generic[DataT]):
    """Every success: `{"code": 200, "message": "success", "data": ...}`. `Envelope[TaskPublic]`
    says what `data` holds, for /openapi.json and for checking the answers against it."""

    code: int = 200
    message: str = "success"
    data: DataT


class ErrorBody(BaseModel):
    """Every error, from every route."""

    error: ErrorDetail


# -- usage and ledger (native /api/v1/usage, /api/v1/ledger; the admin API's too) ------------


class UsageFigures(BaseModel):
    """Server -> client: what was used. `credits` = `credits_charged` - `credits_refunded`."""

    tasks: int
    images: int
    credits_charged: int
    credits_refunded: int
    credits: int


class UsageDay(UsageFigures):
    date: date_


class UsageRow(UsageFigures):
    """One key's usage on one day for one quality and surface."""

    date: date_
    key_id: str
    quality: str
    surface: str


class UsageReportPublic(BaseModel):
    """Server -> client: usage over whole UTC days, `from` to `to` inclusive. `days` and `rows`
    leave out days with no use."""

    model_config = ConfigDict(populate_by_name=True)

    from_: date_ = Field(alias="from")
    to: date_
    key_id: str | None
    totals: UsageFigures
    days: list[UsageDay]
    rows: list[UsageRow]


class LedgerEntryPublic(BaseModel):
    """Server -> client: one credit movement. `amount` is signed (a reserve is negative);
    `quality` and `surface` are those of the entry's task, null for grants and adjustments."""

    id: int
    created_at: datetime
    key_id: str
    kind: str
    amount: int
    task_id: str | None
    quality: str | None
    surface: str | None
    note: str | None


class LedgerPage(BaseModel):
    entries: list[LedgerEntryPublic]
    next_cursor: str | None
    has_more: bool


class SizeRules(BaseModel):
    """Outgoing: the sizes a submit accepts (the presets, or a custom W*H within these rules)."""

    presets: list[str]
    min_side: int
    max_side: int
    side_multiple_of: int
    max_pixels: int


class ServerInfoPublic(BaseModel):
    """Outgoing, public (no key): what this server offers, for the try-it page and clients."""

    version: str
    models: list[str]
    engine: str
    note: str | None
    credits_per_image: dict[str, int]
    default_quality: str
    sizes: SizeRules
    max_prompt_chars: int
    max_images_per_request: int
