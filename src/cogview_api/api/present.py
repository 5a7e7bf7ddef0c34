"""Domain objects -> wire schemas."""

from __future__ import annotations

from cogview_api.api.schemas import (
    CreditsPublic,
    ErrorDetail,
    ImagePublic,
    ProgressPublic,
    RequestPublic,
    TaskCreated,
    TaskPublic,
)
from cogview_api.domain import Task


def image_url(base: str, token: str, fmt: str) -> str:
    return f"{base}/images/{token}.{fmt}"


def task_public(task: Task, base: str) -> TaskPublic:
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
        status=task.state.wire_status,  # type: ignore[arg-type]
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
            stage=task.stage.value,
            percent=task.percent,
            step=task.step,
            total_steps=task.steps,
            queue_position=task.queue_position,
        ),
        images=[
            ImagePublic(
                url=image_url(base, img.token, img.format),
                width=img.width,
                height=img.height,
                seed=img.seed,
                format=img.format,
            )
            for img in task.images
        ],
        credits=CreditsPublic(charged=task.credits_charged, refunded=task.credits_refunded),
        error=error,
    )


def task_created(task: Task) -> TaskCreated:
    return TaskCreated(
        task_id=task.id,
        status=task.state.wire_status,  # type: ignore[arg-type]
        created_at=task.created_at,
        credits_charged=task.credits_charged,
        queue_position=task.queue_position,
    )
