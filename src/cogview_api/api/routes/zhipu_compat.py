"""Zhipu BigModel image API, `POST /api/paas/v4/images/generations`: synchronous, on the same
tasks, keys and credits as the native API. Zhipu's `zhipuai` SDK (2.1 and later) works with
`base_url` set to `.../api/paas/v4` and one of our keys as its `api_key`."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from cogview_api.api import examples
from cogview_api.api.compat_schemas import (
    ZhipuImage,
    ZhipuImageCreate,
    ZhipuImagesResponse,
)
from cogview_api.api.deps import BaseUrl, Secret, ServingDep
from cogview_api.api.idempotency import REPLAYED_HEADER
from cogview_api.api.openapi import sync_generation_docs

router = APIRouter(prefix="/api/paas/v4", tags=["zhipu"])


@router.post(
    "/images/generations",
    response_model=ZhipuImagesResponse,
    response_model_exclude_none=True,
    **sync_generation_docs(
        "zhipu",
        body=ZhipuImageCreate,
        request_examples=examples.ZHIPU_REQUESTS,
        answer_example=examples.ZHIPU_ANSWER,
    ),
    summary="Generate an image (Zhipu BigModel API)",
)
async def create_image(
    request: Request,
    response: Response,
    secret: Secret,
    serving: ServingDep,
    base: BaseUrl,
) -> ZhipuImagesResponse:
    done = await serving.generate(
        request,
        surface="zhipu",
        schema=ZhipuImageCreate,
        secret=secret,
    )
    response.headers.update(done.headers)
    if done.replayed:
        response.headers[REPLAYED_HEADER] = "true"
    task = done.task
    images = [ZhipuImage(url=base.url(i, task.expires_at)) for i in task.images]
    return ZhipuImagesResponse(
        id=done.body.request_id, created=int(task.created_at.timestamp()), data=images
    )
