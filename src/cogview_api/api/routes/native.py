"""The native API, `/api/v1`: the hosted CogView 4 API and our extensions."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from cogview_api.api import events, examples, idempotency
from cogview_api.api.deps import (
    BaseUrl,
    From,
    Secret,
    ServingDep,
    SettingsDep,
    StatusFilter,
    To,
)
from cogview_api.api.idempotency import REPLAYED_HEADER
from cogview_api.api.metrics import count_cancelled
from cogview_api.api.openapi import (
    RATELIMIT_HEADERS,
    error_responses,
    example_media,
    json_200,
    json_request_body,
)
from cogview_api.api.present import task_created, task_public
from cogview_api.api.present_usage import ledger_page, usage_public
from cogview_api.api.schemas import (
    AccountPublic,
    Envelope,
    GenerationCreate,
    LedgerPage,
    TaskCreated,
    TaskList,
    TaskPublic,
    UsageReportPublic,
)
from cogview_api.api.serving import Accepted, GenerationServing, give_back
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.services import usage as usage_service

router = APIRouter(prefix="/api/v1", tags=["native"])

SubmitAnswer = Envelope[TaskCreated | TaskPublic]

MAX_WAIT_S = 60

SUBMIT_HEADERS = [
    idempotency.OPENAPI_PARAMETER,
    {
        "name": "Prefer",
        "in": "header",
        "required": False,
        "description": "`wait=N` (N <= 60): hold the request until the task is finished, at "
        "most N seconds, and answer with the full task object if it did.",
        "schema": {"type": "string", "example": "wait=30"},
    },
]
SUBMIT_ANSWER_HEADERS = {
    **idempotency.OPENAPI_ANSWER_HEADER,
    **RATELIMIT_HEADERS,
    "Preference-Applied": {
        "description": "`wait=N` when `data` is the finished task.",
        "schema": {"type": "string"},
    },
}


@router.post(
    "/images/generations",
    response_model=SubmitAnswer,
    responses={
        200: {
            **json_200(named=examples.SUBMIT_ANSWERS),
            "headers": SUBMIT_ANSWER_HEADERS,
        },
        **error_responses(
            "native",
            400,
            401,
            402,
            403,
            409,
            413,
            429,
            500,
            503,
            messages={409: "This Idempotency-Key was already used with a different request."},
        ),
    },
    openapi_extra={
        "parameters": SUBMIT_HEADERS,
        "requestBody": json_request_body(GenerationCreate, examples.NATIVE_REQUESTS),
    },
    summary="Create an image generation task",
)
async def create_generation(
    request: Request, response: Response, secret: Secret, serving: ServingDep, base: BaseUrl
) -> SubmitAnswer:
    wait = requested_wait(request.headers.get("prefer"))  # before anything is written
    if not wait:
        accepted = await _accept(request, response, secret, serving)
        return SubmitAnswer(data=task_created(accepted.task))
    async with serving.holding("wait", secret):  # 429 before anything is written
        accepted = await _accept(request, response, secret, serving)
        task = await serving.wait(secret, accepted.task.id, wait)
    if task.state.terminal:
        response.headers["Preference-Applied"] = f"wait={wait}"
        return SubmitAnswer(data=task_public(task, base))
    # Timed out: the acceptance, with the status and queue position of now.
    return SubmitAnswer(data=task_created(task))


async def _accept(
    request: Request, response: Response, secret: str, serving: GenerationServing
) -> Accepted[GenerationCreate]:
    accepted = await serving.accept(
        request, surface="native", schema=GenerationCreate, secret=secret
    )
    response.headers.update(accepted.headers)
    if accepted.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    return accepted


def requested_wait(prefer: str | None) -> int:
    """Seconds asked for by `Prefer: wait=N` (RFC 7240), capped at 60; 0 if none or malformed
    (a preference the server cannot read is ignored, as the RFC says). N is ASCII digits only:
    str.isdigit alone also passes superscripts, which int() refuses, and numbers of any length."""
    for pref in (prefer or "").split(","):
        name, _, value = pref.strip().partition("=")
        value = value.strip()
        if name.strip().lower() == "wait" and value.isascii() and value.isdigit():
            return MAX_WAIT_S if len(value) > 3 else min(int(value), MAX_WAIT_S)
    return 0


@router.get(
    "/tasks/{task_id}",
    response_model=Envelope[TaskPublic],
    responses={
        200: json_200(examples.TASK_ANSWER),
        **error_responses("native", 401, 403, 404, 500, 503),
    },
    summary="Get a task",
)
async def get_task(
    task_id: str, request: Request, secret: Secret, serving: ServingDep
) -> Envelope[TaskPublic]:
    task = await serving.read_task(secret, task_id)
    return Envelope[TaskPublic](data=task_public(task, serving.links(request)))


@router.post(
    "/tasks/{task_id}/cancel",
    response_model=Envelope[TaskPublic],
    responses={
        200: json_200(examples.CANCEL_ANSWER),
        **error_responses("native", 401, 403, 404, 409, 413, 500, 503),
    },
    summary="Cancel a task",
)
async def cancel_task(
    task_id: str, request: Request, secret: Secret, serving: ServingDep
) -> Envelope[TaskPublic]:
    task = await run_in_threadpool(
        generation.cancel_for, serving.db, secret=secret, task_id=task_id
    )
    serving.signals.notify(task.id)  # requests waiting on it (Prefer: wait, streams) answer now
    count_cancelled("native", task)
    return Envelope[TaskPublic](data=task_public(task, serving.links(request)))


@router.get(
    "/tasks/{task_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`event: task` frames of the task object, until it is terminal.",
            "content": {
                "text/event-stream": {
                    # One Server-Sent Event, as SSE-aware tools (schemathesis) read a stream:
                    # its `event` name and its `data`, the task object as JSON.
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["task"]},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "description": "The task object (as GET /api/v1/tasks/{id}).",
                            },
                        },
                        "required": ["event", "data"],
                    },
                    **example_media(examples.EVENTS_ANSWER),
                }
            },
        },
        **error_responses(
            "native",
            401,
            403,
            404,
            429,
            500,
            503,
            messages={
                429: "This key has 20 event streams open, its most "
                "(COGVIEW_MAX_STREAMS_PER_KEY); close one and try again."
            },
        ),
    },
    summary="Follow a task (Server-Sent Events)",
)
async def task_events(
    task_id: str, secret: Secret, serving: ServingDep, settings: SettingsDep, base: BaseUrl
) -> StreamingResponse:
    slot = await serving.take_slot("stream", secret)  # 429 before anything else is read
    try:
        # Read before the stream starts, so an unknown task is a plain 404.
        first = await serving.read_task(secret, task_id)
    except BaseException:
        await give_back(slot)
        raise
    stream = events.task_stream(
        watcher=serving.watcher,
        first=first,
        base=base,
        keepalive_s=settings.sse_keepalive_seconds,
    )
    return events.TaskEventsResponse(stream, slot=slot)


@router.get(
    "/tasks",
    response_model=Envelope[TaskList],
    responses={
        200: json_200(examples.LIST_ANSWER),
        **error_responses("native", 400, 401, 403, 500, 503),
    },
    summary="List your tasks",
)
async def list_tasks(
    request: Request,
    secret: Secret,
    serving: ServingDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})] = 20,
    cursor: Annotated[str | None, Query()] = None,
) -> Envelope[TaskList]:
    page, next_cursor = await run_in_threadpool(
        lambda: generation.list_tasks_for(
            serving.db,
            secret=secret,
            status=status,
            limit=limit,
            cursor=cursor,
            batch_size=serving.settings.max_batch_size,
        )
    )
    base = serving.links(request)
    data = TaskList(
        tasks=[task_public(t, base) for t in page],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )
    return Envelope[TaskList](data=data)


@router.get(
    "/account",
    response_model=Envelope[AccountPublic],
    responses={
        200: json_200(examples.ACCOUNT_ANSWER),
        **error_responses("native", 401, 403, 500, 503),
    },
    summary="Your key's account",
)
async def get_account(secret: Secret, serving: ServingDep) -> Envelope[AccountPublic]:
    acct = await run_in_threadpool(key_service.account_for, serving.db, secret)
    data = AccountPublic(
        key_id=acct.key.id,
        name=acct.key.name,
        balance=acct.key.balance,
        images_generated=acct.images_generated,
        credits_spent=acct.credits_spent,
    )
    return Envelope[AccountPublic](data=data)


@router.get(
    "/usage",
    response_model=Envelope[UsageReportPublic],
    responses={
        200: json_200(examples.USAGE_ANSWER),
        **error_responses(
            "native",
            *(400, 401, 403, 500, 503),
            messages={400: "from must not be after to"},
            params={400: "from"},
        ),
    },
    summary="Your key's usage per day, by quality and surface",
)
async def get_usage(
    serving: ServingDep,
    secret: Secret,
    start: From = None,
    end: To = None,
) -> Envelope[UsageReportPublic]:
    report = await run_in_threadpool(
        lambda: usage_service.usage_for(serving.db, secret=secret, start=start, end=end)
    )
    return Envelope[UsageReportPublic](data=usage_public(report))


@router.get(
    "/ledger",
    response_model=Envelope[LedgerPage],
    responses={
        200: json_200(examples.LEDGER_ANSWER),
        **error_responses(
            "native",
            *(400, 401, 403, 500, 503),
            messages={400: "cursor is not valid"},
            params={400: "cursor"},
        ),
    },
    summary="Your key's credit ledger, newest first",
)
async def get_ledger(
    serving: ServingDep,
    secret: Secret,
    limit: Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})] = 20,
    cursor: Annotated[str | None, Query()] = None,
) -> Envelope[LedgerPage]:
    rows, next_cursor = await run_in_threadpool(
        lambda: usage_service.ledger_for(serving.db, secret=secret, limit=limit, cursor=cursor)
    )
    return Envelope[LedgerPage](data=ledger_page(rows, next_cursor))
