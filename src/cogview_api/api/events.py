"""Server-Sent Events of one task: the task object on every change, until it is terminal.

The stream is `event: task` + `data: <task object JSON>` frames, the first one the state at
connection time, the last one the terminal state; then the server closes it. The task row is
re-read every EVENTS_RECHECK_S (it is written by workers in any process); an in-process
settle or cancel signals at once. A comment line keeps an idle stream open through proxies.
A server shutting down ends its streams (uvicorn waits for open responses before it stops).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from cogview_api.api.present import ImageLinks, task_public
from cogview_api.api.serving import GenerationServing
from cogview_api.domain import Task
from cogview_api.errors import CogviewError

log = logging.getLogger(__name__)

EVENTS_RECHECK_S = 0.25
KEEPALIVE = ": keep-alive\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each frame on, do not buffer the response
}


def task_frame(task: Task, base: ImageLinks) -> str:
    return f"event: task\ndata: {task_public(task, base).model_dump_json()}\n\n"


async def task_stream(
    *,
    serving: GenerationServing,
    secret: str,
    first: Task,
    base: ImageLinks,
    keepalive_s: float,
) -> AsyncIterator[str]:
    """Frames for `first` and each change of it, ending after its terminal state. Cancelled
    (and so ended) by Starlette when the client disconnects."""
    signals = serving.signals
    task, sent, last_write = first, "", time.monotonic()
    with signals.subscribe(task.id) as settled:
        while True:
            frame = task_frame(task, base)
            if frame != sent:
                yield frame
                sent, last_write = frame, time.monotonic()
            elif time.monotonic() - last_write >= keepalive_s:
                yield KEEPALIVE
                last_write = time.monotonic()
            if task.state.terminal:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), timeout=EVENTS_RECHECK_S)
            if signals.closing:  # the server is shutting down: end; the client reconnects
                return
            # A worker that lost its lease also signals; the task may still be running.
            settled.clear()
            try:
                task = await serving.read_task(secret, task.id)
            except CogviewError as exc:  # database unavailable: end; the client reconnects
                log.warning("event stream of task %s ended: %s", task.id, exc.message)
                return
