"""Domain objects -> wire schemas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from cogview_api.api.schemas import (
    CreditsPublic,
    ErrorDetail,
    ImagePublic,
    PreviewPublic,
    ProgressPublic,
    RequestPublic,
    TaskCreated,
    TaskPublic,
    WebhookAttemptPublic,
    WebhookPublic,
)
from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import ImageRecord, Task, WebhookDelivery

# Signs a GET URL for a storage key, valid the given seconds (at most SigV4's 7 days):
# `services.images.presigner`.
Presign = Callable[[str, int], str]


def image_url(base: str, token: str, fmt: str) -> str:
    return f"{base}/images/{token}.{fmt}"


@dataclass(frozen=True)
class ImageLinks:
    """Where the image URLs of a response point (COGVIEW_IMAGE_URLS).

    Without `presign` ("proxy"): this API's `/images/{token}.{fmt}`, which serves the bytes
    from any storage. With it ("presigned"): a presigned GET URL of the object in the bucket,
    valid for the image's remaining retention but at most SigV4's 7 days, so with a longer
    retention a client gets a fresh URL by reading the task again. Once the retention has
    passed, the API's URL again, which answers 404 like every expired image.
    """

    base: str
    presign: Presign | None = None

    def url(self, image: ImageRecord, expires_at: datetime | None) -> str:
        if self.presign is not None and expires_at is not None:
            seconds = int((expires_at - utcnow()).total_seconds())
            if seconds >= 1:
                return self.presign(image.storage_key, seconds)
        return image_url(self.base, image.token, image.format)


def task_public(task: Task, base: ImageLinks) -> TaskPublic:
    error = None
    if task.error_code is not None:
        error = ErrorDetail(
            code=task.error_code,
            type=task.error_type or "server_error",
            message=task.error_message or "",
        )
    return TaskPublic(
        task_id=task.id,
        model=task.model,
        status=task.state.wire_status,
        created_at=task.created_at,
        started_at=task.started_at,
        completed_at=task.completed_at,
        expires_at=task.expires_at,
        request=RequestPublic(
            prompt=task.prompt,
            negative_prompt=task.negative_prompt,
            size=str(task.size),
            quality=task.quality,
            n=task.n,
            seed=task.seeds[0] if task.seed_given else None,
            output_format=task.output_format,
            user_id=task.user_id,
        ),
        progress=ProgressPublic(
            stage=task.stage,
            percent=task.percent,
            step=task.step,
            total_steps=task.steps,
            queue_position=task.queue_position,
        ),
        images=[
            ImagePublic(
                url=base.url(img, task.expires_at),
                width=img.width,
                height=img.height,
                seed=img.seed,
                format=img.format,
            )
            for img in task.images
        ],
        credits=CreditsPublic(charged=task.credits_charged, refunded=task.credits_refunded),
        error=error,
        webhook=webhook_public(task.webhook) if task.webhook else None,
        batch_id=task.batch_id,
        batch_index=task.batch_index,
        previews=_previews(task, base) if task.previews else None,
    )


def _previews(task: Task, base: ImageLinks) -> list[PreviewPublic]:
    # Previews are served by token like images; presigned links work for them the same way.
    return [
        PreviewPublic(
            index=p.index,
            step=p.step,
            url=base.url(
                ImageRecord(
                    token=p.token,
                    index=p.index,
                    width=p.width,
                    height=p.height,
                    seed=task.seeds[0],
                    format=p.format,
                    storage_key=p.storage_key,
                ),
                task.expires_at,
            ),
        )
        for p in task.preview_list
    ]


def webhook_payload(settings: Settings) -> Callable[[Task], str]:
    """The webhook dispatcher's renderer: a settled task -> the JSON payload of its webhook.

    The payload is the task object as GET /api/v1/tasks/{id} shows it, minus its `webhook`
    field, which changes with every attempt while the signed payload must not. Its image URLs
    are this API's own, also with COGVIEW_IMAGE_URLS=presigned: a payload is fixed at the first
    attempt and may be retried for hours, and these URLs work for the whole retention.
    """

    def render(task: Task) -> str:
        base = task.base_url or settings.public_url
        if not base:  # a task submitted before base_url was recorded
            base = f"http://{settings.host}:{settings.port}"
        links = ImageLinks(base=base.rstrip("/"))
        return task_public(task, links).model_dump_json(exclude={"webhook"})

    return render


def webhook_public(delivery: WebhookDelivery) -> WebhookPublic:
    return WebhookPublic(
        id=delivery.id,
        event=delivery.event,
        status=delivery.state,
        attempts=[
            WebhookAttemptPublic(number=a.number, at=a.at, status_code=a.status_code, error=a.error)
            for a in delivery.attempts
        ],
        next_attempt_at=delivery.next_attempt_at,
    )


def task_created(task: Task) -> TaskCreated:
    return TaskCreated(
        task_id=task.id,
        status=task.state.wire_status,
        created_at=task.created_at,
        credits_charged=task.credits_charged,
        queue_position=task.queue_position,
    )
