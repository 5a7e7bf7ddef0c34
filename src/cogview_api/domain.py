"""Pure types of the domain: states, stages, sizes, qualities, formats, generation requests,
webhook deliveries. No I/O here, and nothing of the package above it: every layer may import it.

The enums are `StrEnum`s: a member is its wire and database string (`Quality.HD == "hd"`).
The dataclasses that the store fills from rows turn those strings back into members.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum
from typing import Literal, Protocol

MODEL_NAMES = ("cogview-4", "cogview-4-250304")
MAX_PROMPT_CHARS = 1000
MAX_USER_ID_CHARS = 128
MAX_IMAGES_PER_REQUEST = 4
MAX_PREVIEWS = 3  # partial previews a task may ask for (native `previews`, OpenAI `partial_images`)
MAX_SEED = 2**32 - 1
# The slowest submit rate a key may be given (one a million seconds): below it the rate's
# interval leaves a float's range (a subnormal rate made every submit a 500). 0 = no limit.
MIN_SUBMIT_RATE = 1e-6
DEFAULT_COMPRESSION = 92  # JPEG/WebP quality when a request names none
MAX_PIXELS = 2**21
MIN_SIDE = 512  # a custom size's width and height: MIN_SIDE..MAX_SIDE, multiples of SIDE_STEP
MAX_SIDE = 2048
SIDE_STEP = 16
PRESET_SIZES = (
    (1024, 1024),
    (768, 1344),
    (864, 1152),
    (1344, 768),
    (1152, 864),
    (1440, 720),
    (720, 1440),
)
TASK_ID_SUFFIX = "_cv4"


class TaskState(StrEnum):
    """Where a task is in its life. The `tasks` row is also the queue item."""

    QUEUED = "queued"  # waiting to be claimed by a worker
    RUNNING = "running"  # claimed; a worker holds a lease on it
    COMPLETED = "completed"  # images stored; terminal
    FAILED = "failed"  # credits refunded; terminal
    CANCELLED = "cancelled"  # credits refunded; terminal

    @property
    def terminal(self) -> bool:
        return self in (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)

    @property
    def wire_status(self) -> WireStatus:
        """The hosted API's status word: waiting and running are both IN_PROGRESS."""
        return _WIRE_STATUS[self]


# A task's `status` on the wire, as the hosted API spells it.
WireStatus = Literal["IN_PROGRESS", "COMPLETED", "FAILED", "CANCELLED"]
_WIRE_STATUS: dict[TaskState, WireStatus] = {
    TaskState.QUEUED: "IN_PROGRESS",
    TaskState.RUNNING: "IN_PROGRESS",
    TaskState.COMPLETED: "COMPLETED",
    TaskState.FAILED: "FAILED",
    TaskState.CANCELLED: "CANCELLED",
}


class PriorityClass(IntEnum):
    """A task's class in the queue (`tasks.priority`): a claim takes the waiting tasks of the
    lowest class first, and a task of a later class only when none of an earlier one waits (or
    to fill a batch's room). Fairness between API keys holds within each class."""

    INTERACTIVE = 0  # a request a client waits on: submits of every surface
    BATCH = 1  # work a client does not wait on (the batches API)


class Stage(StrEnum):
    QUEUED = "queued"
    ENCODING = "encoding"
    DENOISING = "denoising"
    DECODING = "decoding"
    SAVING = "saving"
    DONE = "done"


class Quality(StrEnum):
    """How hard the model works on an image: its steps (and price) come from the settings.
    `low` is reached through OpenAI's quality `low` only (the native API keeps the hosted
    API's two names)."""

    LOW = "low"
    STANDARD = "standard"
    HD = "hd"


# The qualities of the native and Zhipu surfaces (the hosted API's two names).
NATIVE_QUALITIES = (Quality.STANDARD, Quality.HD)


class OutputFormat(StrEnum):
    """The formats a task's images are encoded, stored and served in; the one list of them."""

    PNG = "png"
    JPEG = "jpeg"
    WEBP = "webp"


class WebhookEvent(StrEnum):
    """What a webhook announces: how its task settled."""

    COMPLETED = "task.completed"
    FAILED = "task.failed"
    CANCELLED = "task.cancelled"

    @classmethod
    def of(cls, state: TaskState) -> WebhookEvent:
        """The event of a task that settled in `state`; ValueError for a state in progress."""
        return cls(f"task.{state.value}")


class DeliveryState(StrEnum):
    """Where a webhook delivery is: the dispatchers' queue holds the pending ones."""

    PENDING = "pending"  # due at next_attempt_at
    DELIVERED = "delivered"  # a 2xx answer; terminal
    FAILED = "failed"  # the retry schedule ran out; terminal


class _Shaped(Protocol):
    """What a batch key is read from: a task, or an engine job."""

    @property
    def width(self) -> int: ...
    @property
    def height(self) -> int: ...
    @property
    def steps(self) -> int: ...
    @property
    def guidance_scale(self) -> float: ...


@dataclass(frozen=True)
class BatchKey:
    """What tasks must share to run in one engine call (one denoising loop)."""

    width: int
    height: int
    steps: int
    guidance_scale: float

    @classmethod
    def of(cls, item: _Shaped) -> BatchKey:
        return cls(item.width, item.height, item.steps, item.guidance_scale)


@dataclass(frozen=True)
class Size:
    width: int
    height: int

    def __str__(self) -> str:
        return f"{self.width}*{self.height}"


_SIZE_RE = re.compile(r"^\s*(\d{1,5})\s*[*xX×]\s*(\d{1,5})\s*$")


def parse_size(text: str) -> Size:
    """`W*H` or `WxH`: a preset, or 512..2048 per side, both divisible by 16, W*H <= 2^21.

    Raises ValueError with a sentence a client can act on.
    """
    match = _SIZE_RE.match(text)
    if match is None:
        raise ValueError(f"size must look like '1024*1024' (width*height), got {text!r}")
    width, height = int(match.group(1)), int(match.group(2))
    if (width, height) in PRESET_SIZES:
        return Size(width, height)
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ValueError(f"size: width and height must each be between {MIN_SIDE} and {MAX_SIDE}")
    if width % SIDE_STEP or height % SIDE_STEP:
        raise ValueError(f"size: width and height must both be divisible by {SIDE_STEP}")
    if width * height > MAX_PIXELS:
        raise ValueError(f"size: width*height must be at most {MAX_PIXELS} pixels")
    return Size(width, height)


@dataclass(frozen=True)
class GenerationRequest:
    """A validated request, independent of the surface (native, OpenAI, Zhipu) it came from."""

    model: str
    prompt: str
    size: Size
    quality: Quality
    n: int
    negative_prompt: str = ""
    seed: int | None = None
    output_format: OutputFormat = OutputFormat.PNG
    user_id: str | None = None
    callback_url: str | None = None
    # JPEG/WebP encoder quality 0..100 (OpenAI's `output_compression`); None: the default.
    output_compression: int | None = None
    previews: int = 0  # partial previews to decode while denoising, 0..MAX_PREVIEWS

    def __post_init__(self) -> None:
        _as_members(self, quality=Quality, output_format=OutputFormat)


def new_task_id() -> str:
    """Opaque, URL-safe, 128 random bits, ending in `_cv4` like the hosted API's ids."""
    return secrets.token_urlsafe(16) + TASK_ID_SUFFIX


def new_image_token() -> str:
    return secrets.token_urlsafe(24)


def preview_steps(previews: int, steps: int) -> tuple[int, ...]:
    """The denoising steps after which a task that asked for `previews` previews decodes one:
    evenly spaced over the run, never its last step (that one is the image itself). With fewer
    than `previews + 1` steps, fewer previews: one per step at most."""
    if previews <= 0 or steps <= 1:
        return ()
    wanted = (round(steps * (i + 1) / (previews + 1)) for i in range(previews))
    return tuple(sorted({min(max(s, 1), steps - 1) for s in wanted}))


def image_seeds(seed: int | None, n: int) -> list[int]:
    """One seed per image: consecutive from the given one, or random. Stored at submit so a
    retried task draws the same images."""
    base = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    return [(base + i) % (MAX_SEED + 1) for i in range(n)]


@dataclass(frozen=True)
class ImageRecord:
    token: str
    index: int
    width: int
    height: int
    seed: int
    format: OutputFormat
    storage_key: str
    # The stored file's length and SHA-256 (hex), recorded when it was written; None for images
    # stored before they were (migration 0007).
    size_bytes: int | None = None
    sha256: str | None = None

    def __post_init__(self) -> None:
        _as_members(self, format=OutputFormat)


@dataclass(frozen=True)
class PreviewRecord:
    """A partial preview of a task's first image: its current prediction decoded after `step`
    of the denoising loop, stored like an image (store/previews.py)."""

    token: str
    index: int  # 0.. in the order decoded
    step: int
    width: int
    height: int
    format: OutputFormat
    storage_key: str

    def __post_init__(self) -> None:
        _as_members(self, format=OutputFormat)


@dataclass(frozen=True)
class WebhookAttempt:
    """One POST of a webhook: the receiver's status code, or why there was none."""

    number: int
    at: datetime
    status_code: int | None
    error: str | None


@dataclass(frozen=True)
class WebhookDelivery:
    """The terminal task object on its way to the task's callback_url."""

    id: str  # the webhook-id header, the same on every attempt
    event: WebhookEvent
    state: DeliveryState
    attempts: tuple[WebhookAttempt, ...]
    next_attempt_at: datetime | None

    def __post_init__(self) -> None:
        _as_members(self, event=WebhookEvent, state=DeliveryState)


@dataclass(frozen=True)
class Task:
    """A task as the store holds it."""

    id: str
    seq: int
    key_id: str
    state: TaskState
    stage: Stage
    model: str
    prompt: str
    negative_prompt: str
    width: int
    height: int
    quality: Quality
    steps: int
    guidance_scale: float
    n: int
    seeds: tuple[int, ...]
    seed_given: bool
    output_format: OutputFormat
    user_id: str | None
    callback_url: str | None
    step: int
    attempts: int
    credits_charged: int
    credits_refunded: int
    error_code: int | None
    error_type: str | None
    error_message: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    expires_at: datetime | None
    worker_id: str | None = None
    images: tuple[ImageRecord, ...] = ()
    queue_position: int | None = None
    base_url: str | None = None  # image URLs' base as the submitter saw it (for webhooks)
    request_id: str | None = None  # X-Request-ID of the request that created it (for logs)
    surface: str = "native"  # the API it came in by: native, openai or zhipu (for metrics)
    webhook: WebhookDelivery | None = None  # once a task with a callback_url has settled
    output_compression: int | None = None  # JPEG/WebP quality; None: DEFAULT_COMPRESSION
    priority: PriorityClass = PriorityClass.INTERACTIVE  # its class in the queue
    batch_id: str | None = None  # the batch it came in by (POST /api/v1/batches), if any
    batch_index: int | None = None  # its line in that batch, 0-based
    previews: int = 0  # partial previews asked for (0: none, and no `previews` on the wire)
    preview_list: tuple[PreviewRecord, ...] = ()  # those decoded so far, by index

    def __post_init__(self) -> None:
        _as_members(self, quality=Quality, output_format=OutputFormat)

    @property
    def preview_steps(self) -> tuple[int, ...]:
        return preview_steps(self.previews, self.steps)

    @property
    def size(self) -> Size:
        return Size(self.width, self.height)

    @property
    def percent(self) -> int:
        if self.state is TaskState.COMPLETED:
            return 100
        if self.stage in (Stage.QUEUED, Stage.ENCODING) or self.steps == 0:
            return 0
        # Denoising is the bulk of the work; decoding and saving fill the last few percent.
        pct = int(95 * self.step / self.steps)
        if self.stage is Stage.DECODING:
            pct = 96
        elif self.stage is Stage.SAVING:
            pct = 98
        return min(pct, 99)


BATCH_ID_PREFIX = "batch_"


def new_batch_id() -> str:
    """Opaque, URL-safe, 128 random bits, as a task id, starting with `batch_`."""
    return BATCH_ID_PREFIX + secrets.token_urlsafe(16)


class BatchStatus(StrEnum):
    """Where a batch is: in progress until every one of its tasks has ended."""

    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"  # every task ended (its counts say how many failed); terminal
    CANCELLED = "cancelled"  # a batch cancel ended the tasks left; terminal

    @property
    def wire_status(self) -> Literal["IN_PROGRESS", "COMPLETED", "CANCELLED"]:
        return _BATCH_WIRE[self]


_BATCH_WIRE: dict[BatchStatus, Literal["IN_PROGRESS", "COMPLETED", "CANCELLED"]] = {
    BatchStatus.IN_PROGRESS: "IN_PROGRESS",
    BatchStatus.COMPLETED: "COMPLETED",
    BatchStatus.CANCELLED: "CANCELLED",
}


class BatchEvent(StrEnum):
    """What a batch's webhook announces: how it ended."""

    COMPLETED = "batch.completed"
    CANCELLED = "batch.cancelled"


@dataclass(frozen=True)
class Batch:
    """A batch as the store holds it, with its tasks counted by state."""

    id: str
    seq: int
    key_id: str
    status: BatchStatus
    total: int  # tasks
    images_total: int
    counts: dict[TaskState, int]  # every state, 0 included
    images_done: int
    credits_charged: int
    credits_refunded: int
    created_at: datetime
    finished_at: datetime | None
    callback_url: str | None
    metadata: dict[str, str] | None
    base_url: str | None = None

    def __post_init__(self) -> None:
        _as_members(self, status=BatchStatus)


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    prefix: str
    balance: int
    created_at: datetime
    revoked_at: datetime | None
    credits_spent: int = 0  # net of refunds
    images_generated: int = 0
    # The key's own limits; None: the settings' (submit_rate 0: no submit rate limit).
    submit_rate: float | None = None
    submit_burst: int | None = None
    max_waiting: int | None = None
    max_streams: int | None = None  # event streams open at once
    max_waits: int | None = None  # `Prefer: wait` submits waiting at once


def _as_members(obj: object, **fields: type[StrEnum]) -> None:
    """Set each named field of a frozen dataclass to its enum's member: a row of the store, or
    a caller's literal, hands the plain string (`"hd"`), and the domain holds `Quality.HD`.
    ValueError for a string that is no member."""
    for name, enum in fields.items():
        object.__setattr__(obj, name, enum(getattr(obj, name)))


# The `error` of a cancelled task. 499 is what Google's APIs map their CANCELLED code to
# ("client closed request"); it is never an HTTP status of a response here.
CANCELLED_CODE = 499
CANCELLED_TYPE = "cancelled"
