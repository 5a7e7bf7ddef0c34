"""HTTP metrics: a pure ASGI middleware that counts and times every answer by route template,
surface and status, and the submit and cancel counts of the generation surfaces.

The route template is the matched route's path (`/api/v1/tasks/{task_id}`, never the task id
itself); a request no route matched is "unmatched". The surface is the route's OpenAPI tag
(native, openai, zhipu, images, health), else "other". Per (route, status) the labelled
children are looked up once and kept, so a request costs two dictionary reads and two
observations (bench/request_ab.py measures it).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cogview_api.domain import Task
from cogview_api.metrics import Instruments, instruments

UNMATCHED = "unmatched"


class HttpMetrics:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.metrics: Instruments = instruments()
        # By (id of the route, status): routes live as long as the app, and FastAPI's define
        # __eq__, which makes them unhashable.
        self._children: dict[tuple[int, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # an exception that escapes every handler is answered 500 by uvicorn

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            counter, histogram = self._labelled(scope.get("route"), status)
            counter.inc()
            histogram.observe(time.perf_counter() - started)

    def _labelled(self, route: Any, status: int) -> tuple[Counter, Histogram]:
        key = (id(route), status)
        found = self._children.get(key)
        if found is None:
            template = getattr(route, "path", None) or UNMATCHED
            tags = getattr(route, "tags", None) or ()
            surface = str(tags[0]) if tags else "other"
            found = (
                self.metrics.http_requests.labels(template, surface, str(status)),
                self.metrics.http_duration.labels(template, surface),
            )
            self._children[key] = found
        return found


def count_submitted(surface: str, task: Task) -> None:
    m = instruments()
    m.tasks_submitted.labels(surface, task.quality.value).inc()
    if task.credits_charged:
        m.credits_charged.labels(surface, task.quality.value).inc(task.credits_charged)


def count_cancelled(surface: str, task: Task) -> None:
    m = instruments()
    m.tasks_cancelled.labels(surface, task.quality.value).inc()
    if task.credits_refunded:
        m.credits_refunded.labels("cancelled").inc(task.credits_refunded)
