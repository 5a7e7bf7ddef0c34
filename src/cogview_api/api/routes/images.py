"""Image bytes by unguessable URL: no bearer needed, so the URL can be an <img src>."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from cogview_api.api.deps import DbDep, StorageDep
from cogview_api.api.openapi import error_responses
from cogview_api.clock import utcnow
from cogview_api.errors import NotFound
from cogview_api.media import CONTENT_TYPES
from cogview_api.store import tasks as task_store

router = APIRouter(tags=["images"])


@router.get(
    "/images/{name}",
    summary="An image of a completed task",
    response_class=Response,
    responses={
        200: {
            "description": "The image bytes, in the format its task asked for.",
            "content": {
                f"image/{fmt}": {"schema": {"type": "string", "format": "binary"}}
                for fmt in ("png", "jpeg", "webp")
            },
        },
        **error_responses(
            "native", 404, 500, 503, messages={404: "No such image (it may have expired)."}
        ),
    },
)
def get_image(name: str, db: DbDep, storage: StorageDep) -> Response:
    token, _, ext = name.rpartition(".")
    with db.read() as conn:
        found = task_store.find_image(conn, token)
    if found is None or found[1] != ext or found[2] <= utcnow():
        raise NotFound("No such image (it may have expired).")
    key, fmt, expires = found
    data = storage.get(key)
    if data is None:
        raise NotFound("No such image (it may have expired).")
    max_age = max(0, int((expires - utcnow()).total_seconds()))
    return Response(
        data,
        media_type=CONTENT_TYPES[fmt],
        headers={"Cache-Control": f"private, max-age={max_age}, immutable"},
    )
