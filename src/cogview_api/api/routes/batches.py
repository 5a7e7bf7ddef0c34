"""The batches API, `/api/v1/batches` (docs/api.md "Batches"): many generation requests in one
submit, paid for up front, run as ordinary tasks of the lower priority class."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.responses import StreamingResponse

from cogview_api.api import events, examples, idempotency
from cogview_api.api.batch_inputs import read_batch
from cogview_api.api.batch_schemas import BatchCreate, BatchList, BatchPublic
from cogview_api.api.deps import BackendsDep, Secret, ServingDep, SettingsDep, StatusFilter
from cogview_api.api.idempotency import REPLAYED_HEADER
from cogview_api.api.openapi import (
    error_responses,
    example_media,
    inline_refs,
    json_200,
    json_request_body,
)
from cogview_api.api.present import task_public
from cogview_api.api.present_batches import batch_public
from cogview_api.api.schemas import Envelope, ErrorDetail, TaskList
from cogview_api.api.serving import give_back
from cogview_api.services import batches as batch_service
from cogview_api.services.batch_archive import archive_chunks

router = APIRouter(prefix="/api/v1/batches", tags=["batches"])

Limit = Annotated[int, Query(json_schema_extra={"minimum": 1, "maximum": 100})]
Cursor = Annotated[str | None, Query()]


class LineErrorPublic(BaseModel):
    index: int
    param: str | None
    message: str


class BatchErrorDetail(ErrorDetail):
    errors: list[LineErrorPublic] | None = None


class BatchErrorBody(BaseModel):
    """A refused batch: the native error, with every bad line in `errors`."""

    error: BatchErrorDetail


def _refused_batch() -> dict[int | str, dict[str, Any]]:
    return {
        400: {
            "model": BatchErrorBody,
            "description": "A bad body, or bad lines: `errors` lists every bad line (0-based "
            "`index`, `param`, `message`); nothing was written.",
            "content": {"application/json": example_media(examples.BATCH_LINE_ERRORS)},
        }
    }


@router.post(
    "",
    response_model=Envelope[BatchPublic],
    responses={
        200: {
            **json_200(examples.BATCH_CREATED_ANSWER),
            "headers": idempotency.OPENAPI_ANSWER_HEADER,
        },
        **error_responses(
            "native",
            *(401, 402, 403, 409, 413, 429, 500, 503),
            messages={
                402: "Insufficient credits: this batch of 2 requests needs 12 credits and "
                "the key's balance is 8.",
                413: "Request body is larger than 16777216 bytes.",
            },
        ),
        **_refused_batch(),
    },
    openapi_extra={
        "parameters": [
            idempotency.OPENAPI_PARAMETER,
            {
                "name": "callback_url",
                "in": "query",
                "required": False,
                "description": "For a JSONL upload only: the batch's callback_url.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    **json_request_body(BatchCreate, examples.BATCH_REQUESTS)["content"][
                        "application/json"
                    ],
                    "schema": inline_refs(BatchCreate.model_json_schema()),
                },
                "application/jsonl": {
                    "schema": {
                        "type": "string",
                        "description": "One body of POST /api/v1/images/generations per "
                        "line (also `application/x-ndjson`); blank lines are ignored.",
                    },
                    "example": examples.BATCH_JSONL,
                },
            },
        },
    },
    summary="Create a batch of image generation tasks",
)
async def create_batch(
    request: Request, response: Response, secret: Secret, serving: ServingDep, settings: SettingsDep
) -> Envelope[BatchPublic]:
    raw = await request.body()
    base = serving.base_url(request)
    submitted = await run_in_threadpool(
        lambda: batch_service.submit_batch_for(
            serving.db,
            settings,
            secret=secret,
            read_batch=lambda: read_batch(request, raw, settings),
            base_url=base,
        )
    )
    if submitted.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    else:
        for notify in serving.on_submit:
            notify()
    return Envelope[BatchPublic](data=batch_public(submitted.batch))


@router.get(
    "",
    response_model=Envelope[BatchList],
    responses={
        200: json_200(examples.BATCH_LIST_ANSWER),
        **error_responses("native", 400, 401, 403, 500, 503),
    },
    summary="List your batches",
)
async def list_batches(
    secret: Secret, serving: ServingDep, limit: Limit = 20, cursor: Cursor = None
) -> Envelope[BatchList]:
    page, next_cursor = await run_in_threadpool(
        lambda: batch_service.list_batches_for(
            serving.db, secret=secret, limit=limit, cursor=cursor
        )
    )
    data = BatchList(
        batches=[batch_public(b) for b in page],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )
    return Envelope[BatchList](data=data)


@router.get(
    "/{batch_id}",
    response_model=Envelope[BatchPublic],
    responses={
        200: json_200(examples.BATCH_ANSWER),
        **error_responses("native", 401, 403, 404, 500, 503),
    },
    summary="Get a batch",
)
async def get_batch(batch_id: str, secret: Secret, serving: ServingDep) -> Envelope[BatchPublic]:
    batch = await run_in_threadpool(
        lambda: batch_service.get_batch_for(serving.db, secret=secret, batch_id=batch_id)
    )
    return Envelope[BatchPublic](data=batch_public(batch))


@router.get(
    "/{batch_id}/tasks",
    response_model=Envelope[TaskList],
    responses={
        200: json_200(examples.BATCH_TASKS_ANSWER),
        **error_responses("native", 400, 401, 403, 404, 500, 503),
    },
    summary="List a batch's tasks, in line order",
)
async def list_batch_tasks(
    batch_id: str,
    request: Request,
    secret: Secret,
    serving: ServingDep,
    status: StatusFilter = None,
    limit: Limit = 20,
    cursor: Cursor = None,
) -> Envelope[TaskList]:
    page, next_cursor = await run_in_threadpool(
        lambda: batch_service.batch_tasks_for(
            serving.db,
            secret=secret,
            batch_id=batch_id,
            status=status,
            limit=limit,
            cursor=cursor,
            batch_size=serving.settings.max_batch_size,
        )
    )
    links = serving.links(request)
    data = TaskList(
        tasks=[task_public(t, links) for t in page],
        next_cursor=next_cursor,
        has_more=next_cursor is not None,
    )
    return Envelope[TaskList](data=data)


@router.post(
    "/{batch_id}/cancel",
    response_model=Envelope[BatchPublic],
    responses={
        200: json_200(examples.BATCH_CANCEL_ANSWER),
        **error_responses(
            "native",
            *(401, 403, 404, 409, 413, 500, 503),
            messages={
                409: "The batch is already COMPLETED; only a batch in progress can be cancelled."
            },
        ),
    },
    summary="Cancel a batch: every task not yet ended is cancelled and refunded",
)
async def cancel_batch(batch_id: str, secret: Secret, serving: ServingDep) -> Envelope[BatchPublic]:
    batch = await run_in_threadpool(
        lambda: batch_service.cancel_batch_for(serving.db, secret=secret, batch_id=batch_id)
    )
    serving.signals.notify()  # its streams and waits, and in-process workers, see it now
    return Envelope[BatchPublic](data=batch_public(batch))


@router.get(
    "/{batch_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`event: batch` frames of the batch object, until it has ended.",
            "content": {
                "text/event-stream": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "event": {"type": "string", "enum": ["batch"]},
                            "data": {
                                "type": "string",
                                "contentMediaType": "application/json",
                                "description": "The batch object (as GET /api/v1/batches/{id}).",
                            },
                        },
                        "required": ["event", "data"],
                    },
                    **example_media(examples.BATCH_EVENTS_ANSWER),
                }
            },
        },
        **error_responses(
            "native",
            *(401, 403, 404, 429, 500, 503),
            messages={
                429: "This key has 20 event streams open, its most "
                "(COGVIEW_MAX_STREAMS_PER_KEY); close one and try again."
            },
        ),
    },
    summary="Follow a batch (Server-Sent Events)",
)
async def batch_events(
    batch_id: str, secret: Secret, serving: ServingDep, settings: SettingsDep
) -> StreamingResponse:
    slot = await serving.take_slot("stream", secret)  # 429 before anything else is read
    try:
        first = await run_in_threadpool(
            lambda: batch_service.get_batch_for(serving.db, secret=secret, batch_id=batch_id)
        )
    except BaseException:
        await give_back(slot)
        raise
    stream = events.batch_stream(
        watcher=serving.watcher, first=first, keepalive_s=settings.sse_keepalive_seconds
    )
    return events.TaskEventsResponse(stream, slot=slot)


@router.get(
    "/{batch_id}/archive",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "A ZIP, streamed: `images/{index:05d}-{k}.{ext}` for each finished "
            "image, then `manifest.jsonl` (one line per task, in line order).",
            "content": {"application/zip": {"schema": {"type": "string", "format": "binary"}}},
        },
        **error_responses("native", 401, 403, 404, 500, 503),
    },
    summary="Download a batch's images and manifest (ZIP)",
)
async def batch_archive(
    batch_id: str, secret: Secret, serving: ServingDep, backends: BackendsDep
) -> StreamingResponse:
    batch = await run_in_threadpool(
        lambda: batch_service.get_batch_for(serving.db, secret=secret, batch_id=batch_id)
    )
    return StreamingResponse(
        archive_chunks(serving.db, backends.storage, batch),
        media_type="application/zip",
        headers={
            "Content-Disposition": f'attachment; filename="{batch.id}.zip"',
            "Cache-Control": "no-store",
        },
    )
