"""OpenAI Images API, `POST /v1/images/generations`: synchronous, on the same tasks, keys and
credits as the native API. The official `openai` client works with `base_url` set to `.../v1`.
`GET /v1/models` lists what this server serves, as OpenAI-style tools expect to find it."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cogview_api.api import examples
from cogview_api.api.compat_schemas import (
    OpenAIImage,
    OpenAIImageCreate,
    OpenAIImagesResponse,
    OpenAIModel,
    OpenAIModelList,
    OpenAIUsage,
)
from cogview_api.api.deps import BackendsDep, BaseUrl, Secret, ServingDep
from cogview_api.api.events import TaskEventsResponse
from cogview_api.api.idempotency import REPLAYED_HEADER
from cogview_api.api.openai_stream import COMPLETED, PARTIAL, image_event_stream
from cogview_api.api.openapi import (
    error_responses,
    example_media,
    json_200,
    sync_generation_docs,
)
from cogview_api.domain import MODEL_NAMES
from cogview_api.errors import NotFound
from cogview_api.services import images as image_service
from cogview_api.services import keys as key_service

router = APIRouter(prefix="/v1", tags=["openai"])

# CogView4-6B's release (2025-03-04), the `created` of every name it is served under.
MODEL_CREATED = 1741046400
MODELS = {
    name: OpenAIModel(id=name, created=MODEL_CREATED, owned_by="zhipuai") for name in MODEL_NAMES
}


def _generation_docs() -> dict[str, Any]:
    """The synchronous route's docs, and its 200 with `stream: true`: OpenAI's image events."""
    docs = sync_generation_docs(
        "openai",
        body=OpenAIImageCreate,
        request_examples=examples.OPENAI_REQUESTS,
        answer_example=examples.OPENAI_ANSWER,
    )
    docs["responses"][200]["content"]["text/event-stream"] = {
        # One Server-Sent Event, as SSE-aware tools read a stream: its name and its data.
        "schema": {
            "type": "object",
            "properties": {
                "event": {"type": "string", "enum": [PARTIAL, COMPLETED, "error"]},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "description": "The event as JSON, its `type` the event's name; `error`: "
                    "OpenAI's error envelope.",
                },
            },
            "required": ["event", "data"],
        },
        **example_media(examples.OPENAI_STREAM_ANSWER),
    }
    docs["responses"][200]["description"] = (
        "The images; with `stream: true`, OpenAI's image event stream instead."
    )
    return docs


@router.post(
    "/images/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    **_generation_docs(),
    summary="Generate images (OpenAI Images API)",
)
async def create_image(
    request: Request,
    response: Response,
    secret: Secret,
    serving: ServingDep,
    backends: BackendsDep,
    base: BaseUrl,
) -> OpenAIImagesResponse | Response:
    if _asks_to_stream(await request.body()):
        accepted, slot = await serving.accept_streaming(
            request, surface="openai", schema=OpenAIImageCreate, secret=secret
        )
        events = image_event_stream(
            serving=serving,
            backends=backends,
            body=accepted.body,
            first=accepted.task,
            wait_s=serving.settings.sync_wait_seconds,
        )
        streaming = TaskEventsResponse(events, slot=slot)
        streaming.headers.update(accepted.headers)
        if accepted.replayed:
            streaming.headers[REPLAYED_HEADER] = "true"
        return streaming
    done = await serving.generate(
        request,
        surface="openai",
        schema=OpenAIImageCreate,
        secret=secret,
    )
    response.headers.update(done.headers)
    if done.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    body, task = done.body, done.task
    if body.response_format == "b64_json":
        encoded = await run_in_threadpool(image_service.images_base64, backends.storage, task)
        images = [OpenAIImage(b64_json=b64) for b64 in encoded]
    else:
        images = [OpenAIImage(url=base.url(i, task.expires_at)) for i in task.images]
    return OpenAIImagesResponse(
        created=int(task.created_at.timestamp()),
        data=images,
        output_format=task.output_format,
        quality=body.answered_quality,
        size=f"{task.width}x{task.height}",
        usage=OpenAIUsage(images=len(task.images), credits=task.credits_charged),
    )


def _asks_to_stream(raw: bytes) -> bool:
    """Whether a body asks for the event stream; anything unreadable goes the usual way,
    where it is refused in the envelope."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):  # nested too deep: refused the usual way too
        return False
    return isinstance(data, dict) and data.get("stream") is True


@router.get(
    "/models",
    response_model=OpenAIModelList,
    responses={
        200: json_200(examples.OPENAI_MODELS),
        **error_responses("openai", 401, 403, 500, 503),
    },
    summary="The models this server serves (OpenAI Models API)",
)
async def list_models(secret: Secret, serving: ServingDep) -> OpenAIModelList:
    await run_in_threadpool(key_service.authenticate, serving.db, secret)
    return OpenAIModelList(data=list(MODELS.values()))


@router.get(
    "/models/{model_id}",
    response_model=OpenAIModel,
    responses={
        200: json_200(examples.OPENAI_MODEL),
        **error_responses(
            "openai",
            401,
            403,
            404,
            500,
            503,
            messages={404: "The model 'dall-e-3' does not exist on this server."},
        ),
    },
    summary="One model this server serves (OpenAI Models API)",
)
async def get_model(model_id: str, secret: Secret, serving: ServingDep) -> OpenAIModel:
    await run_in_threadpool(key_service.authenticate, serving.db, secret)
    try:
        return MODELS[model_id]
    except KeyError:
        raise NotFound(f"The model '{model_id}' does not exist on this server.") from None
