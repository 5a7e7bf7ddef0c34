"""OpenAI Images API, `POST /v1/images/generations`: synchronous, on the same tasks, keys and
credits as the native API. The official `openai` client works with `base_url` set to `.../v1`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from cogview_api.api import examples
from cogview_api.api.compat_schemas import (
    OpenAIImage,
    OpenAIImageCreate,
    OpenAIImagesResponse,
)
from cogview_api.api.deps import BackendsDep, BaseUrl, Secret, ServingDep
from cogview_api.api.idempotency import REPLAYED_HEADER
from cogview_api.api.openapi import sync_generation_docs
from cogview_api.services import images as image_service

router = APIRouter(prefix="/v1", tags=["openai"])


@router.post(
    "/images/generations",
    response_model=OpenAIImagesResponse,
    response_model_exclude_none=True,
    **sync_generation_docs(
        "openai",
        body=OpenAIImageCreate,
        request_examples=examples.OPENAI_REQUESTS,
        answer_example=examples.OPENAI_ANSWER,
    ),
    summary="Generate images (OpenAI Images API)",
)
async def create_image(
    request: Request,
    response: Response,
    secret: Secret,
    serving: ServingDep,
    backends: BackendsDep,
    base: BaseUrl,
) -> OpenAIImagesResponse:
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
    return OpenAIImagesResponse(created=int(task.created_at.timestamp()), data=images)
