"""Batches -> wire schemas, and the body of a batch's webhook."""

from __future__ import annotations

from collections.abc import Callable

from cogview_api.api.batch_schemas import (
    BatchCounts,
    BatchImages,
    BatchPublic,
    BatchWebhook,
)
from cogview_api.api.schemas import CreditsPublic
from cogview_api.clock import utcnow
from cogview_api.domain import Batch, BatchEvent, TaskState


def batch_public(batch: Batch) -> BatchPublic:
    c = batch.counts
    return BatchPublic(
        batch_id=batch.id,
        status=batch.status.wire_status,
        total=batch.total,
        counts=BatchCounts(
            queued=c[TaskState.QUEUED],
            running=c[TaskState.RUNNING],
            completed=c[TaskState.COMPLETED],
            failed=c[TaskState.FAILED],
            cancelled=c[TaskState.CANCELLED],
        ),
        images=BatchImages(done=batch.images_done, total=batch.images_total),
        credits=CreditsPublic(charged=batch.credits_charged, refunded=batch.credits_refunded),
        created_at=batch.created_at,
        finished_at=batch.finished_at,
        callback_url=batch.callback_url,
        metadata=batch.metadata,
    )


def batch_webhook_payload() -> Callable[[Batch, str], str]:
    """The webhook dispatcher's renderer of a batch's webhook: `{"type", "timestamp",
    "data": BATCH}`, fixed at its first attempt like a task's."""

    def render(batch: Batch, event: str) -> str:
        body = BatchWebhook(
            type=BatchEvent(event).value,
            timestamp=utcnow(),
            data=batch_public(batch),
        )
        return body.model_dump_json()

    return render
