"""Image bytes by unguessable URL: no bearer needed, so the URL can be an <img src>."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from cogview_api.api.deps import BackendsDep
from cogview_api.api.openapi import error_responses
from cogview_api.media import CONTENT_TYPES
from cogview_api.services import images as image_service

router = APIRouter(tags=["images"])


@router.get(
    "/images/{name}",
    summary="An image of a completed task",
    response_class=Response,
    responses={
        200: {
            "description": "The image bytes, in the format its task asked for.",
            "content": {
                content_type: {"schema": {"type": "string", "format": "binary"}}
                for content_type in CONTENT_TYPES.values()
            },
        },
        **error_responses("native", 404, 500, 503, messages={404: image_service.GONE}),
    },
)
def get_image(name: str, backends: BackendsDep) -> Response:
    image = image_service.image_bytes(backends.db, backends.storage, name)
    headers = {"Cache-Control": f"private, max-age={image.max_age}, immutable"}
    if image.etag is not None:
        headers["ETag"] = f'"{image.etag}"'
    return Response(image.data, media_type=image.content_type, headers=headers)
