"""Zhipu BigModel image API, `POST /api/paas/v4/images/generations`: synchronous, on the same
tasks, keys and credits as the native API. Zhipu's `zhipuai` SDK (2.1 and later) works with
`base_url` set to `.../api/paas/v4` and one of our keys as its `api_key`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from cogview_api.api.compat_schemas import (
    ZhipuErrorBody,
    ZhipuImage,
    ZhipuImageCreate,
    ZhipuImagesResponse,
)
from cogview_api.api.deps import BaseUrl, CurrentKey, DbDep, SettingsDep
from cogview_api.api.errors import invalid_from_validation
from cogview_api.api.inputs import parse_json_object
from cogview_api.api.waiting import generate_and_wait

router = APIRouter(prefix="/api/paas/v4", tags=["zhipu"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ZhipuErrorBody} for code in (400, 401, 402, 403, 413, 500, 503, 504)
}


@router.post(
    "/images/generations",
    response_model=ZhipuImagesResponse,
    responses=ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": ZhipuImageCreate.model_json_schema()}},
        }
    },
    summary="Generate an image (Zhipu BigModel API)",
)
async def create_image(
    request: Request, key: CurrentKey, db: DbDep, settings: SettingsDep, base: BaseUrl
) -> ZhipuImagesResponse:
    data = parse_json_object(request, await request.body())
    try:
        body = ZhipuImageCreate.model_validate(data)
    except ValidationError as exc:
        raise invalid_from_validation(exc) from exc
    task = await generate_and_wait(
        request, db=db, settings=settings, key=key, generation_request=body.to_domain()
    )
    images = [ZhipuImage(url=base.url(i, task.expires_at)) for i in task.images]
    return ZhipuImagesResponse(created=int(task.created_at.timestamp()), data=images)
