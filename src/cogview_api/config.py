"""One settings object, read from `COGVIEW_*` variables, validated at start and passed in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cogview_api.addresses import parse_allow_list, parse_retry_schedule
from cogview_api.domain import MIN_SUBMIT_RATE, Quality, parse_size

DEFAULT_MODEL = "THUDM/CogView4-6B"
TINY_MODEL = "tiny"
# CogView4-6B's architecture with random bf16 weights, built on the GPU: speed without weights.
FULL_RANDOM_MODEL = "full-random"


def parse_size_list(text: str) -> list[tuple[int, int]]:
    """`"1024*1024,768*1344"` -> [(1024, 1024), (768, 1344)]; empty -> []."""
    sizes = [parse_size(part) for part in text.split(",") if part.strip()]
    return [(size.width, size.height) for size in sizes]


def default_data_dir() -> Path:
    """Where the database and the images live unless told otherwise: the user's data folder
    (`$XDG_DATA_HOME/cogview-api`, by default `~/.local/share/cogview-api`), the same from any
    current directory, so `keys create` run elsewhere finds the database `serve` uses."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "cogview-api"


# The hosts answered when neither COGVIEW_PUBLIC_URL nor COGVIEW_TRUSTED_HOSTS is set.
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


MIN_ADMIN_TOKEN_CHARS = 32


class Settings(BaseSettings):
    """Every knob of the service. Flags of the CLI override these."""

    model_config = SettingsConfigDict(env_prefix="COGVIEW_", extra="ignore")

    # Where things live. Unset database_url and storage_url are `data_dir`'s cogview.db and
    # images/; a relative data_dir is taken from the current directory at the start.
    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str = ""  # sqlite:///<data_dir>/cogview.db, or postgresql://...
    storage_url: str = ""  # file://<data_dir>/images, or s3://bucket/prefix
    s3_endpoint_url: str | None = None  # an S3-compatible service (MinIO, ...); unset: AWS
    cache_dir: Path = Field(default_factory=lambda: Path.home() / ".cache" / "cogview-api")
    public_url: str | None = None
    # Without public_url, absolute URLs (image links) are built from the request's Host header,
    # so only these hosts are answered (comma-separated names, case-insensitive, port ignored;
    # `*` for any). Empty: localhost, 127.0.0.1, ::1 and COGVIEW_HOST unless that is 0.0.0.0/::.
    trusted_hosts: str = ""
    # The admin API (/admin/v1) is on only while a token is set: at least 32 characters, sent as
    # `Authorization: Bearer <token>`. Its name is the "who" of the audit rows it leaves.
    admin_token: str | None = None
    admin_token_name: str = Field(default="admin", pattern=r"^[A-Za-z0-9._@-]{1,48}$")

    # The model and how it runs.
    model: str = DEFAULT_MODEL
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    steps_hd: int = Field(default=50, ge=1, le=200)
    steps_standard: int = Field(default=20, ge=1, le=200)
    # OpenAI's quality `low` (docs/api.md, "Quality"): fewer steps than `medium` (= standard).
    steps_low: int = Field(default=10, ge=1, le=200)
    guidance_scale: float = Field(default=3.5, ge=1.0, le=20.0)

    # The fast engine (issue 4; docs/architecture.md "The fast path"). `engine`: fast = ours,
    # same images as stock within fp reassociation; stock = diffusers' CogView4Pipeline as is.
    # `text_encoder` (fast engine): gpu = resident; cpu = encodes on the CPU; offload = on the
    # GPU only while encoding (both CUDA only); int8 = resident, int8 weights via torchao (the
    # images change slightly). `torch_compile`: auto = on with CUDA.
    # `compile_sizes`: comma-separated W*H warmed up at load when compiling.
    engine: Literal["fast", "stock"] = "fast"
    text_encoder: Literal["gpu", "cpu", "offload", "int8"] = "gpu"
    torch_compile: Literal["auto", "on", "off"] = "auto"
    compile_sizes: str = "1024*1024"
    # Speed modes that CHANGE the image, off by default. first-block: skip blocks 1..N at a step
    # when block 0's output moved less than the threshold since the last computed step.
    unsafe_step_cache: Literal["off", "first-block"] = "off"
    step_cache_threshold: float = Field(default=0.1, gt=0.0, le=1.0)
    # FP8 (e4m3) attention and feed-forward matmuls via torchao; CUDA capability 8.9+ only.
    unsafe_fp8: bool = False

    @field_validator("compile_sizes")
    @classmethod
    def _compile_sizes(cls, value: str) -> str:
        parse_size_list(value)  # a bad size stops the start, not the warm-up
        return value

    @property
    def compile_size_list(self) -> list[tuple[int, int]]:
        return parse_size_list(self.compile_sizes)

    # Serving.
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=0, le=16)
    # HTTP processes sharing the port (`serve --http-processes N`); the in-process workers stay
    # in the first process. Each has its own database pool (store/db.py; docs/deploy.md).
    http_processes: int = Field(default=1, ge=1, le=64)
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    # POST /api/v1/batches (docs/api.md "Batches"): at most this many requests in one batch,
    # and its own body limit (JSON or JSONL) in place of max_body_bytes.
    batch_max_requests: int = Field(default=10_000, ge=1, le=1_000_000)
    batch_max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=1024**3)
    # HTTP limits (docs/deploy.md): a request whose line and headers pass `http_max_header_bytes`
    # gets 431; its headers must arrive within `http_header_timeout_seconds` of its first byte
    # (or of the connection), its body within `http_body_timeout_seconds` of its headers; an
    # idle keep-alive connection closes after `http_keep_alive_seconds`; past
    # `http_max_connections` open connections (per HTTP process) a new one is answered 503.
    http_max_header_bytes: int = Field(default=64 * 1024, ge=4096, le=16 * 1024 * 1024)
    http_header_timeout_seconds: float = Field(default=10.0, gt=0.0)
    http_body_timeout_seconds: float = Field(default=30.0, gt=0.0)
    http_keep_alive_seconds: float = Field(default=5.0, gt=0.0)
    http_max_connections: int = Field(default=2048, ge=1)
    max_queue: int = Field(default=1000, ge=1)
    # Waiting tasks one key may have; over it a submit gets 429. While the whole queue is full
    # (max_queue), a key with fewer than its equal share of it is still admitted.
    max_waiting_per_key: int = Field(default=100, ge=1)
    # Submits per second one key may make, with bursts of up to submit_burst at once (GCRA, kept
    # in the database so every API replica enforces the same numbers); over it, 429. A key's own
    # values (`cogview-api keys limits`) replace these. 0 = no submit rate limit.
    submit_rate: float = Field(default=10.0, ge=0.0, le=1_000_000.0)
    submit_burst: int = Field(default=50, ge=1, le=1_000_000)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Prometheus metrics (docs/deploy.md "Metrics and alerts"). `metrics`: off = no /metrics,
    # no HTTP instrumentation, no worker exporter. `metrics_port`: serve them there (on `host`)
    # instead of at the API's /metrics; for `cogview-api worker` (`--metrics-port`), the port
    # of its own exporter, which it has only when this is set.
    metrics: bool = True
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # text: one readable line per record; json: one JSON object per line, for log shippers.
    log_format: Literal["text", "json"] = "text"
    # One info line per HTTP request (method, path, status, milliseconds, request id).
    access_log: bool = False
    # A comment line on an idle event stream this often, so proxies keep the connection open.
    sse_keepalive_seconds: float = Field(default=15.0, gt=0.0)
    # Event streams one key may hold open, and `Prefer: wait` submits it may have waiting at
    # once, across all API processes; over either the request gets 429 before anything is
    # written (services/follow_limits.py).
    max_streams_per_key: int = Field(default=20, ge=1, le=100_000)
    max_waits_per_key: int = Field(default=20, ge=1, le=100_000)
    # The task watcher (services/watch.py): how often it looks at the followed tasks, one
    # statement for all, where writers in other processes cannot tell it (SQLite, or `listen`
    # off); and on PostgreSQL with LISTEN, how often it looks anyway (a lost notification).
    watch_poll_seconds: float = Field(default=0.25, gt=0.0, le=60.0)
    watch_fallback_seconds: float = Field(default=2.0, gt=0.0, le=60.0)
    # How long the synchronous OpenAI and Zhipu routes hold a request for its task; under the
    # Zhipu SDK's 300 s read timeout, so its clients get our answer instead of a retry.
    sync_wait_seconds: float = Field(default=280.0, gt=0.0, le=3600.0)
    # How long after a synchronous route's request a retry of it joins its task instead of
    # making (and charging) a new one (docs/api.md, "Retries"); 0 turns the joining off.
    retry_window_seconds: float = Field(default=600.0, ge=0.0, le=86400.0)

    # Credits: price per image by quality.
    price_standard: int = Field(default=4, ge=0)
    price_hd: int = Field(default=4, ge=0)
    price_low: int = Field(default=2, ge=0)

    # The queue.
    lease_seconds: float = Field(default=60.0, gt=0.5)
    # SIGTERM/SIGINT: how long `serve` lets its workers finish the batch in hand before it hands
    # that batch back to the queue (no attempt counted) and exits.
    shutdown_grace_seconds: float = Field(default=30.0, ge=0.0)
    max_attempts: int = Field(default=3, ge=1)
    poll_interval: float = Field(default=0.5, gt=0.0)
    max_batch_size: int = Field(default=1, ge=1, le=16)
    retention_days: float = Field(default=7.0, gt=0.0)
    # Queue wake-ups and dynamic batching (issues 3 and 4). `listen`: on PostgreSQL, workers
    # wake on LISTEN/NOTIFY (off behind a transaction-pooling PgBouncer, which cannot LISTEN;
    # they then poll). `batch_timeout`: seconds a worker whose claim came back short of
    # max_batch_size waits for more tasks of the same batch key before it starts the batch.
    listen: bool = True
    batch_timeout: float = Field(default=0.05, ge=0.0, le=5.0)

    # Image URLs on S3 (issue 3): "proxy" = the API serves the bytes; "presigned" = the task's
    # image URLs are presigned GET URLs of the bucket (S3 storage only), signed for
    # s3_public_endpoint_url when clients reach the store at another address than the API does.
    image_urls: Literal["proxy", "presigned"] = "proxy"
    s3_public_endpoint_url: str | None = Field(default=None, pattern=r"^https?://[^\s/]+")

    # Webhooks (`callback_url`). Hosts or CIDRs a callback may reach although they are
    # loopback, private or link-local, comma-separated: "127.0.0.1,10.0.0.0/8,hooks.internal".
    webhook_allow_hosts: str = ""
    # Seconds before each retry of a failed delivery, comma-separated; after the last one it
    # gives up. The default retries for 3.7 hours (8 attempts).
    webhook_retry_schedule: str = "5,30,120,600,1800,3600,7200"
    webhook_timeout_seconds: float = Field(default=10.0, gt=0.0, le=60.0)
    webhook_poll_seconds: float = Field(default=1.0, gt=0.0, le=60.0)

    def allowed_hosts(self) -> frozenset[str] | None:
        """The Host names a request may carry, or None for any: with public_url set no URL is
        built from the Host header, and `*` is the operator saying so."""
        if self.public_url or self.trusted_hosts.strip() == "*":
            return None
        names = {h.strip().lower().strip("[]") for h in self.trusted_hosts.split(",") if h.strip()}
        if not names:
            names = set(LOCAL_HOSTS)
            if self.host not in ("0.0.0.0", "::", ""):
                names.add(self.host.lower().strip("[]"))
        return frozenset(names)

    @field_validator("submit_rate")
    @classmethod
    def _submit_rate(cls, value: float) -> float:
        if 0 < value < MIN_SUBMIT_RATE:
            raise ValueError(f"must be 0 (no limit) or at least {MIN_SUBMIT_RATE:g} a second")
        return value

    @field_validator("webhook_allow_hosts")
    @classmethod
    def _allow_hosts(cls, value: str) -> str:
        parse_allow_list(value)  # a malformed entry stops the start, not the first webhook
        return value

    @field_validator("webhook_retry_schedule")
    @classmethod
    def _retry_schedule(cls, value: str) -> str:
        parse_retry_schedule(value)
        return value

    @property
    def webhook_retry_delays(self) -> tuple[float, ...]:
        return parse_retry_schedule(self.webhook_retry_schedule)

    @model_validator(mode="after")
    def _places(self) -> Settings:
        self.data_dir = self.data_dir.expanduser().absolute()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'cogview.db'}"
        if not self.storage_url:
            self.storage_url = f"file://{self.data_dir / 'images'}"
        return self

    @model_validator(mode="after")
    def _refuse_unsafe(self) -> Settings:
        if self.admin_token is not None:
            if len(self.admin_token) < MIN_ADMIN_TOKEN_CHARS:
                raise ValueError(
                    f"COGVIEW_ADMIN_TOKEN must be at least {MIN_ADMIN_TOKEN_CHARS} characters "
                    "(make one with: python -c 'import secrets; print(secrets.token_urlsafe(32))')"
                )
            if not all("!" <= ch <= "~" for ch in self.admin_token):
                raise ValueError(
                    "COGVIEW_ADMIN_TOKEN must be printable ASCII without spaces (it travels in "
                    "an Authorization header)"
                )
        if self.image_urls == "presigned" and not self.storage_url.startswith("s3://"):
            raise ValueError(
                "COGVIEW_IMAGE_URLS=presigned needs images in S3 (COGVIEW_STORAGE_URL=s3://...); "
                "with local files use COGVIEW_IMAGE_URLS=proxy."
            )
        if self.batch_timeout >= self.lease_seconds / 3:
            # Tasks are claimed before the wait and their leases renewed only once the engine
            # starts: a wait that long could let them lapse and run twice.
            raise ValueError(
                "COGVIEW_BATCH_TIMEOUT must be under a third of COGVIEW_LEASE_SECONDS "
                f"({self.lease_seconds / 3:g} s)."
            )
        return self

    @property
    def worker_stale_seconds(self) -> float:
        """A worker whose heartbeat is older is gone: not counted ready, its row pruned. Three
        leases (at least 30 s): a live one beats every third of a lease even mid-batch."""
        return max(30.0, 3 * self.lease_seconds)

    @property
    def is_tiny(self) -> bool:
        return self.model == TINY_MODEL

    def steps_for(self, quality: Quality) -> int:
        return {
            Quality.LOW: self.steps_low,
            Quality.STANDARD: self.steps_standard,
            Quality.HD: self.steps_hd,
        }[quality]

    def price_for(self, quality: Quality) -> int:
        """Credits per image of `quality`: the one price function (a submit of n images is
        charged n times it)."""
        return {
            Quality.LOW: self.price_low,
            Quality.STANDARD: self.price_standard,
            Quality.HD: self.price_hd,
        }[quality]
