"""Server-Sent Events of one task (and of one batch, `batch_stream`): the task object on every
change, until it is terminal.

The stream is `event: task` + `data: <task object JSON>` frames, the first one the state at
connection time, the last one the terminal state; then the server closes it. The stream reads
nothing itself after the first frame: the process's task watcher (services/watch.py) follows
the task for every stream of it at once and hands over each new state. A comment line keeps
an idle stream open through proxies. A revoked key's stream ends without another frame. A
server shutting down ends its streams (uvicorn waits for open responses before it stops).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from cogview_api.api.present import ImageLinks, task_public
from cogview_api.api.present_batches import batch_public
from cogview_api.api.serving import give_back
from cogview_api.domain import Batch, BatchStatus, Task
from cogview_api.services.follow_limits import Slot
from cogview_api.services.watch import TaskWatcher

log = logging.getLogger(__name__)

KEEPALIVE = ": keep-alive\n\n"
HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass each frame on, do not buffer the response
}


def task_frame(task: Task, base: ImageLinks) -> str:
    return f"event: task\ndata: {task_public(task, base).model_dump_json()}\n\n"


async def task_stream(
    *,
    watcher: TaskWatcher,
    first: Task,
    base: ImageLinks,
    keepalive_s: float,
) -> AsyncIterator[str]:
    """Frames for `first` and each change of it, ending after its terminal state. Cancelled
    (and so ended) by Starlette when the client disconnects."""
    task, sent, last_write = first, "", time.monotonic()
    with watcher.follow(first) as follower:
        while True:
            frame = task_frame(task, base)
            if frame != sent:
                yield frame
                sent, last_write = frame, time.monotonic()
            if task.state.terminal:
                return
            quiet = last_write + keepalive_s - time.monotonic()
            try:
                await asyncio.wait_for(follower.changed.wait(), timeout=max(0.0, quiet))
            except TimeoutError:
                yield KEEPALIVE
                last_write = time.monotonic()
                continue
            follower.changed.clear()
            if watcher.closing:  # the server is shutting down: end; the client reconnects
                return
            if follower.revoked or follower.gone:
                log.info("event stream of task %s ended: its key was revoked", task.id)
                return
            task = follower.task


def batch_frame(batch: Batch) -> str:
    return f"event: batch\ndata: {batch_public(batch).model_dump_json()}\n\n"


async def batch_stream(
    *, watcher: TaskWatcher, first: Batch, keepalive_s: float
) -> AsyncIterator[str]:
    """`event: batch` frames of the batch object: the first at once, one per change (the
    process's watcher follows the batch for every stream of it), the last its final state."""
    batch, sent, last_write = first, "", time.monotonic()
    with watcher.follow_batch(first) as follower:
        while True:
            frame = batch_frame(batch)
            if frame != sent:
                yield frame
                sent, last_write = frame, time.monotonic()
            if batch.status is not BatchStatus.IN_PROGRESS:
                return
            quiet = last_write + keepalive_s - time.monotonic()
            try:
                await asyncio.wait_for(follower.changed.wait(), timeout=max(0.0, quiet))
            except TimeoutError:
                yield KEEPALIVE
                last_write = time.monotonic()
                continue
            follower.changed.clear()
            if watcher.closing:
                return
            if follower.revoked or follower.gone:
                log.info("event stream of batch %s ended: its key was revoked", batch.id)
                return
            batch = follower.batch


class TaskEventsResponse(StreamingResponse):
    """The stream's response, which gives back the key's stream slot however it ends, even
    when the stream never started (the client left before the headers were sent)."""

    def __init__(self, content: AsyncIterator[str], *, slot: Slot) -> None:
        super().__init__(content, media_type="text/event-stream", headers=HEADERS)
        self.slot = slot

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await give_back(self.slot)
