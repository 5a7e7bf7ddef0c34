"""OpenAI's image event stream: `POST /v1/images/generations` with `stream: true`.

What the `openai` SDKs read with their streaming iterator (`ImageGenStreamEvent`): one
`image_generation.partial_image` event per partial preview as the worker stores it (the task's
`previews`, asked for by `partial_images`), then one `image_generation.completed` event per
image, each an SSE frame `event: <type>` + `data: <JSON with the same type>`. The events are made
from the task as the process's watcher (services/watch.py) follows it, like the native event
stream. A task that fails, is cancelled, or is still running after COGVIEW_SYNC_WAIT_SECONDS
ends the stream with an `error` event in OpenAI's envelope, which the SDKs raise as `APIError`;
the credits of a failed or cancelled task are refunded by then.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool

from cogview_api.api.compat_schemas import OpenAIImageCreate
from cogview_api.api.serving import GenerationServing
from cogview_api.domain import Task, TaskState
from cogview_api.services import images as image_service
from cogview_api.services.backends import Backends

PARTIAL = "image_generation.partial_image"
COMPLETED = "image_generation.completed"


def _frame(data: dict[str, Any]) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n"


def _error_frame(message: str, kind: str, code: str) -> str:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return f"event: error\ndata: {json.dumps(body, separators=(',', ':'))}\n\n"


class ImageEvents:
    """The events of one streamed request, from its task as it changes."""

    def __init__(self, body: OpenAIImageCreate, backends: Backends) -> None:
        self.body = body
        self.storage = backends.storage
        self.sent_partials = 0

    def _common(self, task: Task) -> dict[str, Any]:
        return {
            "background": "opaque",
            "quality": self.body.answered_quality,
            "size": f"{task.width}x{task.height}",
        }

    async def partials(self, task: Task) -> AsyncIterator[str]:
        """The previews of `task` not sent yet, in order. A preview is WebP whatever the
        request's format (docs/api.md), and its event says so."""
        for preview in task.preview_list[self.sent_partials :]:
            if preview.index != self.sent_partials:
                break  # an earlier one is not stored yet (a retried task's): wait for it
            b64 = await run_in_threadpool(image_service.preview_base64, self.storage, preview)
            self.sent_partials += 1
            if b64 is None:  # expired meanwhile: nothing to show
                continue
            yield _frame(
                {
                    "type": PARTIAL,
                    "b64_json": b64,
                    "partial_image_index": preview.index,
                    "output_format": preview.format.value,
                    "created_at": int(time.time()),
                    **self._common(task),
                }
            )

    async def completed(self, task: Task) -> AsyncIterator[str]:
        """One event per image. `usage` is that image's: 1 image and its share of the credits
        (token counts are 0: this server counts images and credits, not tokens)."""
        encoded = await run_in_threadpool(image_service.images_base64, self.storage, task)
        credits = task.credits_charged // max(1, len(encoded))
        created = int((task.completed_at or task.created_at).timestamp())
        for b64 in encoded:
            event: dict[str, Any] = {
                "type": COMPLETED,
                "b64_json": b64,
                "output_format": task.output_format.value,
                "created_at": created,
                "usage": {
                    "images": 1,
                    "credits": credits,
                    "input_tokens": 0,
                    "input_tokens_details": {"image_tokens": 0, "text_tokens": 0},
                    "output_tokens": 0,
                    "total_tokens": 0,
                },
                **self._common(task),
            }
            if task.user_id is not None:
                event["safety_identifier"] = task.user_id
            yield _frame(event)


async def image_event_stream(
    *,
    serving: GenerationServing,
    backends: Backends,
    body: OpenAIImageCreate,
    first: Task,
    wait_s: float,
) -> AsyncIterator[str]:
    """The events of `first`'s task until its images (or its end). Starlette cancels this
    when the client disconnects; the task then goes on, and a retry of the request joins it."""
    events = ImageEvents(body, backends)
    deadline = time.monotonic() + wait_s
    task, answered = first, False
    try:
        with serving.watcher.follow(first) as follower:
            while True:
                async for frame in events.partials(task):
                    yield frame
                if task.state is TaskState.COMPLETED:
                    async for frame in events.completed(task):
                        yield frame
                    answered = True
                    await serving.note_answer(task.id, "delivered")
                    return
                if task.state.terminal:
                    answered = True
                    await serving.note_answer(task.id, "delivered")
                    word = "cancelled" if task.state is TaskState.CANCELLED else "failed"
                    reason = task.error_message or "no reason given"
                    yield _error_frame(f"Task {task.id} {word}: {reason}", "server_error", word)
                    return
                left = deadline - time.monotonic()
                if left <= 0 or serving.watcher.closing or follower.revoked or follower.gone:
                    answered = True
                    await serving.note_answer(task.id, "timed_out")
                    yield _error_frame(
                        f"Task {task.id} did not finish within {wait_s:g} s. It is still "
                        f"running: GET /api/v1/tasks/{task.id} with the same key gives its "
                        "images.",
                        "timeout",
                        "timeout",
                    )
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(follower.changed.wait(), timeout=left)
                follower.changed.clear()
                task = follower.task
    finally:
        if not answered:  # the client hung up first: its retry may join the task
            await serving.note_answer(first.id, "gone")
