"""Holding a request until its task settles: `Prefer: wait` on the native submit, and the
synchronous OpenAI- and Zhipu-compatible routes."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TypeVar

from fastapi import Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from cogview_api.api.compat_schemas import CompatImageCreate
from cogview_api.api.errors import invalid_from_validation
from cogview_api.api.idempotency import REPLAYED_HEADER, idempotency_key
from cogview_api.api.inputs import parse_json_object
from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Task, TaskState
from cogview_api.errors import TaskCancelled, TaskFailed, WaitTimedOut
from cogview_api.services import generation
from cogview_api.services.generation import IdempotencyKey, Submission
from cogview_api.services.signals import TaskSignals
from cogview_api.store.db import Database

WAIT_RECHECK_S = 0.5

Body = TypeVar("Body", bound=CompatImageCreate)


async def wait_until_terminal(
    request: Request, db: Database, key: ApiKey, task_id: str, seconds: float
) -> Task | None:
    """The task once it is terminal, or None after `seconds`. An in-process worker signals
    the end at once; the row is re-read every WAIT_RECHECK_S for workers in other processes."""
    signals: TaskSignals = request.app.state.signals
    deadline = time.monotonic() + seconds
    with signals.subscribe(task_id) as settled:
        while True:
            task = await run_in_threadpool(generation.get_task, db, key=key, task_id=task_id)
            left = deadline - time.monotonic()
            if task.state.terminal or left <= 0:
                return task if task.state.terminal else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settled.wait(), timeout=min(WAIT_RECHECK_S, left))
            # A signal for a task that is not terminal yet (a worker lost its lease and let
            # go of it) must not leave the event set, or this loop would spin.
            settled.clear()


async def generate_and_wait(
    request: Request,
    *,
    db: Database,
    settings: Settings,
    key: ApiKey,
    generation_request: GenerationRequest,
    idempotency: IdempotencyKey | None = None,
) -> Submission:
    """Submit as the native route does (credits reserved with the task, in one transaction;
    with an Idempotency-Key, a retry gets the first request's task), wake in-process workers,
    and hold the request up to `settings.sync_wait_seconds`.

    Returns the COMPLETED task, `replayed` if an earlier request made it. Raises TaskFailed
    or TaskCancelled if it ended without images (the credits are refunded by then),
    WaitTimedOut if it is still running (it stays charged and keeps going; the message names
    it so the client can fetch it from the native API)."""
    submitted = await run_in_threadpool(
        lambda: generation.submit_idempotent(
            db, settings, key=key, request=generation_request, idempotency=idempotency
        )
    )
    task = submitted.task
    if not submitted.replayed:
        for notify in request.app.state.on_submit:
            notify()
    finished = await wait_until_terminal(request, db, key, task.id, settings.sync_wait_seconds)
    if finished is None:
        raise WaitTimedOut(
            f"Task {task.id} did not finish within {settings.sync_wait_seconds:g} s. It is "
            f"still running: GET /api/v1/tasks/{task.id} with the same key gives its images."
        )
    reason = finished.error_message or "no reason given"
    if finished.state is TaskState.CANCELLED:
        raise TaskCancelled(f"Task {task.id} was cancelled: {reason}")
    if finished.state is not TaskState.COMPLETED:
        raise TaskFailed(f"Task {task.id} failed: {reason}")
    return Submission(finished, submitted.replayed)


async def generate_sync(
    request: Request,
    response: Response,
    *,
    surface: str,
    schema: type[Body],
    db: Database,
    settings: Settings,
    key: ApiKey,
) -> tuple[Body, Task]:
    """A synchronous compat route from body to finished task: parse and validate the body
    with the surface's schema, submit (honouring Idempotency-Key), wait, and mark a replay
    with its header. Errors are raised for the surface's envelope to render."""
    data = parse_json_object(request, await request.body())
    try:
        body = schema.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from exc
    submitted = await generate_and_wait(
        request,
        db=db,
        settings=settings,
        key=key,
        generation_request=body.to_domain(),
        idempotency=idempotency_key(request, surface, data),
    )
    if submitted.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return body, submitted.task
