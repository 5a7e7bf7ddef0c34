"""Zhipu BigModel image API, `POST /api/paas/v4/images/generations`: synchronous, on the same
tasks, keys and credits as the native API. Zhipu's `zhipuai` SDK (2.1 and later) works with
`base_url` set to `.../api/paas/v4` and one of our keys as its `api_key`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from cogview_api.api import examples
from cogview_api.api.compat_schemas import (
    ZhipuImage,
    ZhipuImageCreate,
    ZhipuImagesResponse,
)
from cogview_api.api.deps import BaseUrl, CurrentKey, DbDep, SettingsDep
from cogview_api.api.idempotency import (
    OPENAPI_ANSWER_HEADER,
    OPENAPI_PARAMETER,
)
from cogview_api.api.openapi import error_responses, example_media, json_200
from cogview_api.api.waiting import generate_sync

router = APIRouter(prefix="/api/paas/v4", tags=["zhipu"])

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**json_200(examples.ZHIPU_ANSWER), "headers": OPENAPI_ANSWER_HEADER},
    **error_responses(
        "zhipu",
        *(400, 401, 402, 403, 409, 413, 500, 503, 504),
        messages={409: f"Task {examples.TASK_ID} was cancelled: Cancelled by the client."},
    ),
}


@router.post(
    "/images/generations",
    response_model=ZhipuImagesResponse,
    responses=RESPONSES,
    openapi_extra={
        "parameters": [OPENAPI_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": ZhipuImageCreate.model_json_schema(),
                    **example_media(named=examples.ZHIPU_REQUESTS),
                }
            },
        },
    },
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
