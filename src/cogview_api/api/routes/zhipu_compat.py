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
from cogview_api.api.deps import BaseUrl, CurrentKey, DbDep, SettingsDep
from cogview_api.api.openapi import sync_generation_docs
from cogview_api.api.waiting import generate_sync

router = APIRouter(prefix="/api/paas/v4", tags=["zhipu"])


@router.post(
    "/images/generations",
    response_model=ZhipuImagesResponse,
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
    key: CurrentKey,
    db: DbDep,
    settings: SettingsDep,
    base: BaseUrl,
) -> ZhipuImagesResponse:
    _, task = await generate_sync(
        request,
        response,
        surface="zhipu",
        schema=ZhipuImageCreate,
        db=db,
        settings=settings,
        key=key,
    )
    images = [ZhipuImage(url=base.url(i, task.expires_at)) for i in task.images]
    return ZhipuImagesResponse(created=int(task.created_at.timestamp()), data=images)
