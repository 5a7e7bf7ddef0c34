"""`GET /metrics`: Prometheus's text format (not in the OpenAPI document: it is for scrapers)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from cogview_api.metrics import CONTENT_TYPE, render

router = APIRouter(include_in_schema=False)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    # A plain def: FastAPI runs it in the thread pool, where the database gauges may query.
    return Response(render([request.app.state.queue_collector]), media_type=CONTENT_TYPE)
