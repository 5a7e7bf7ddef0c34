"""SQLAlchemy Core tables. The `tasks` table is both the record of a task and the queue item."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in and out, on SQLite (which keeps no zone) and PostgreSQL alike."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),
    Column("key_hash", String(64), nullable=False, unique=True),
    Column("prefix", String(16), nullable=False),
    Column("balance", BigInteger, nullable=False, default=0),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    # Signs this key's webhooks: the server must sign with it, so it is stored as given (like
    # Stripe's and Svix's endpoint secrets), unlike the key itself, of which only a hash is kept.
    Column("webhook_secret", String(64), nullable=False),
    # Kept by triggers on `ledger` and `images` (migration 0004), for /account: credits spent
    # net of refunds, and images generated.
    Column("credits_spent", BigInteger, nullable=False, server_default="0"),
    Column("images_generated", BigInteger, nullable=False, server_default="0"),
    # The key's own limits, NULL: the settings' (migration 0008; `cogview-api keys limits`).
    Column("submit_rate", Double, nullable=True),  # submits per second; 0: no rate limit
    Column("submit_burst", Integer, nullable=True),
    Column("max_waiting", Integer, nullable=True),
    # GCRA: the "theoretical arrival time" of the key's next submit, seconds since the epoch.
    Column("submit_tat", Double, nullable=True),
    # The key's own caps on open event streams and `Prefer: wait` requests (NULL: the settings'
    # COGVIEW_MAX_STREAMS_PER_KEY / COGVIEW_MAX_WAITS_PER_KEY), `keys follow-limits` (0012).
    Column("max_streams", Integer, nullable=True),
    Column("max_waits", Integer, nullable=True),
    CheckConstraint("balance >= 0", name="balance_not_negative"),
)

# Append-only: every credit movement, so any balance can be traced to its rows.
ledger = Table(
    "ledger",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("kind", String(16), nullable=False),  # grant | reserve | refund | adjust
    Column("amount", BigInteger, nullable=False),  # signed: reserve < 0, refund > 0
    Column("task_id", String(64), nullable=True),
    Column("note", String(200), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_ledger_key_id", "key_id"),
    Index("ix_ledger_created_at", "created_at"),  # the usage reports' date ranges (0010)
)

tasks = Table(
    "tasks",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # queue order and list cursor
    Column("id", String(64), nullable=False, unique=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("state", String(16), nullable=False),
    Column("stage", String(16), nullable=False),
    Column("model", String(64), nullable=False),
    Column("prompt", Text, nullable=False),
    Column("negative_prompt", Text, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("quality", String(16), nullable=False),
    Column("steps", Integer, nullable=False),
    Column("guidance_scale", Float, nullable=False),
    Column("n", Integer, nullable=False),
    Column("seeds", JSON, nullable=False),
    Column("seed_given", Boolean, nullable=False),
    Column("output_format", String(8), nullable=False),
    Column("user_id", String(128), nullable=True),
    Column("callback_url", Text, nullable=True),
    # The base of image URLs as the submitter saw them, for webhook bodies rendered later,
    # away from any request.
    Column("base_url", Text, nullable=True),
    # X-Request-ID of the creating request: the worker's log lines about the task carry it.
    Column("request_id", String(128), nullable=True),
    # JPEG/WebP quality the request asked for (OpenAI's output_compression); NULL: the default.
    Column("output_compression", Integer, nullable=True),
    # The queue class (domain.PriorityClass, migration 0015): a claim takes class 0 first.
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    Column("step", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("max_attempts", Integer, nullable=False),
    Column("worker_id", String(64), nullable=True),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("credits_charged", BigInteger, nullable=False),
    Column("credits_refunded", BigInteger, nullable=False, default=0),
    Column("error_code", Integer, nullable=True),
    Column("error_type", String(32), nullable=True),
    Column("error_message", Text, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("started_at", UTCDateTime, nullable=True),
    Column("completed_at", UTCDateTime, nullable=True),
    Column("expires_at", UTCDateTime, nullable=True),
    # The API the task came in by: native | openai | zhipu (migration 0010), for usage reports.
    Column("surface", String(16), nullable=False, server_default="native"),
    # The batch the task came in by, and its line there (0-based); NULL for a task submitted
    # alone (migration 0016).
    Column("batch_id", String(64), nullable=True),
    Column("batch_index", Integer, nullable=True),
    # Partial previews asked for (NULL: none) and stored so far (migration 0017).
    Column("previews", Integer, nullable=True),
    Column("previews_made", Integer, nullable=True),
    Index("ix_tasks_key_seq", "key_id", "seq"),
    Index("ix_tasks_state_seq", "state", "seq"),
    Index("ix_tasks_key_state_seq", "key_id", "state", "seq"),
    Index("ix_tasks_state_priority_key_seq", "state", "priority", "key_id", "seq"),
    # A class's waiting tasks oldest first, passing over some keys in the index (migration 0018).
    Index("ix_tasks_state_priority_seq", "state", "priority", "seq", "key_id"),
    Index("ix_tasks_batch_index", "batch_id", "batch_index"),
)

# One row per POST /api/v1/batches (migration 0016); its tasks are ordinary `tasks` rows with
# its id in batch_id. `live` counts its tasks not yet ended: the transaction that ends one
# decrements it (store/batches.py), and the one that takes it to 0 ends the batch.
batches = Table(
    "batches",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # list order and cursor
    Column("id", String(64), nullable=False, unique=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("status", String(16), nullable=False),  # in_progress | completed | cancelled
    Column("total", Integer, nullable=False),  # tasks
    Column("images_total", Integer, nullable=False),
    Column("live", Integer, nullable=False),
    Column("callback_url", Text, nullable=True),
    Column("base_url", Text, nullable=True),  # for the webhook's body, rendered later
    Column("user_metadata", JSON, nullable=True),  # the client's metadata, as given
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Index("ix_batches_key_seq", "key_id", "seq"),
)

images = Table(
    "images",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("seed", BigInteger, nullable=False),
    Column("format", String(8), nullable=False),
    Column("storage_key", Text, nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    # The stored file's length and SHA-256 (migration 0007; NULL for images stored before).
    Column("size_bytes", BigInteger, nullable=True),
    Column("sha256", String(64), nullable=True),
    Index("ix_images_task_id", "task_id"),
    Index("ix_images_expires_at", "expires_at"),
)

# Partial previews of a task's first image, decoded while it is denoised (worker/previews.py):
# served like images by their random token, deleted after the same retention (0017).
previews = Table(
    "previews",
    metadata,
    Column("token", String(64), primary_key=True),
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=False),
    Column("idx", Integer, nullable=False),
    Column("step", Integer, nullable=False),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("format", String(8), nullable=False),
    Column("storage_key", Text, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("expires_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    UniqueConstraint("task_id", "idx"),
    Index("ix_previews_expires_at", "expires_at"),
)

# Idempotency-Key records, scoped per API key: a retry with the same key and the same request
# hash within 24 h answers with task_id instead of creating (and charging) a new task.
idempotency_keys = Table(
    "idempotency_keys",
    metadata,
    Column("key_id", String(32), ForeignKey("api_keys.id"), primary_key=True),
    Column("idem_key", String(255), primary_key=True),
    Column("request_hash", String(64), nullable=False),  # sha256 hex of the canonical body
    # Null only inside the submit transaction, between claiming the key and inserting the task.
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # The batch, for a POST /api/v1/batches (its task_id NULL), migration 0016.
    Column("batch_id", String(64), nullable=True),
    Index("ix_idempotency_keys_created_at", "created_at"),
)

# One row per submit on the synchronous OpenAI and Zhipu routes: the hash of its key, surface
# and body, and whether its answer reached the client, so an SDK's retry of it joins its task
# instead of paying again (store/sync_requests.py, migration 0013).
sync_requests = Table(
    "sync_requests",
    metadata,
    Column("task_id", String(64), ForeignKey("tasks.id"), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("request_hash", String(64), nullable=False),  # sha256 hex of surface + body
    # NULL: the request is still waiting for its answer; gone: its client hung up before the
    # answer; timed_out: it got a 504 (still running); delivered: a request of it was
    # answered with the finished task.
    Column("answer", String(16), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_sync_requests_key_id_request_hash", "key_id", "request_hash"),
    Index("ix_sync_requests_key_id_created_at", "key_id", "created_at"),
)

# One webhook delivery per task with a callback_url, written by the transaction that settles
# the task; it is also the dispatchers' queue (state pending, due at next_attempt_at).
webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(64), primary_key=True),  # the webhook-id header, same on every retry
    # A task's webhook, or a batch's (task_id NULL, batch_id set; migration 0016).
    Column("task_id", String(64), ForeignKey("tasks.id"), nullable=True, unique=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("url", Text, nullable=False),
    # task.completed | task.failed | task.cancelled | batch.completed | batch.cancelled
    Column("event", String(32), nullable=False),
    Column("body", Text, nullable=True),  # the signed payload, fixed at the first attempt
    Column("state", String(16), nullable=False),  # pending | delivered | failed (gave up)
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("batch_id", String(64), nullable=True, unique=True),
    Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
)

# Every delivery attempt: its answer (status code) or why there was none (error).
webhook_attempts = Table(
    "webhook_attempts",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("delivery_id", String(64), ForeignKey("webhook_deliveries.id"), nullable=False),
    Column("number", Integer, nullable=False),
    Column("attempted_at", UTCDateTime, nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Index("ix_webhook_attempts_delivery_id", "delivery_id"),
)

# How many tasks wait, as the sum of 16 stripes, kept exact by triggers on `tasks` (migrations
# 0004, 0005: on SQLite a task counts in stripe seq % 16; on PostgreSQL each connection updates
# its own stripe, so no two transactions wait on each other's): the submit reads 16 rows instead
# of counting the queue. A migration
# that rebuilds `tasks` on SQLite (batch mode) drops those triggers and must create them again.
queue_depth = Table(
    "queue_depth",
    metadata,
    Column("stripe", Integer, primary_key=True, autoincrement=False),
    Column("waiting", BigInteger, nullable=False),
)

# Workers announce themselves here; /readyz reads it from any API process.
workers = Table(
    "workers",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("model", String(200), nullable=False),
    Column("device", String(32), nullable=False),
    Column("ready", Boolean, nullable=False),
    Column("started_at", UTCDateTime, nullable=False),
    Column("heartbeat_at", UTCDateTime, nullable=False),
)

# One row per admin action, by the admin API or the CLI (migration 0010): never updated.
admin_audit = Table(
    "admin_audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", UTCDateTime, nullable=False),
    Column("actor", String(64), nullable=False),  # the admin token's name, or cli:<user>
    Column("action", String(64), nullable=False),  # e.g. keys.create, credits.grant
    Column("key_id", String(32), nullable=True),  # the key acted on, if any
    Column("detail", Text, nullable=True),  # JSON: the action's parameters (never a secret)
    Index("ix_admin_audit_key_id", "key_id"),
)

# Held slots of the per-key caps on open event streams and `Prefer: wait` requests, shared by
# every API process: a row per open request, deleted when it ends, with a lease its process
# renews (a process that died leaves rows that lapse; services/follow_limits.py).
follow_slots = Table(
    "follow_slots",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=False),
    Column("kind", String(8), nullable=False),  # stream | wait
    Column("holder", String(32), nullable=False),  # the API process that holds it
    Column("expires_at", UTCDateTime, nullable=False),
    Index("ix_follow_slots_key_id_kind", "key_id", "kind"),
    Index("ix_follow_slots_holder", "holder"),
)
