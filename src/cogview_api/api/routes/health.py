"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from cogview_api.api import examples
from cogview_api.api.deps import BackendsDep, SettingsDep
from cogview_api.api.errors import error_response
from cogview_api.api.openapi import error_responses, json_200
from cogview_api.errors import ServiceUnavailable
from cogview_api.services import health as health_service

router = APIRouter(tags=["health"])


@router.get(
    "/healthz",
    responses={200: json_200(examples.HEALTHZ_ANSWER), **error_responses("native", 500)},
    summary="The process is alive",
)
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    responses={
        200: json_200(examples.READYZ_ANSWER),
        **error_responses(
            "native", 500, 503, messages={503: "No worker has the model loaded yet."}
        ),
    },
    summary="Database reachable and a worker has the model loaded",
)
def readyz(backends: BackendsDep, settings: SettingsDep) -> Any:
    if not backends.db.ping():
        return error_response(
            503, "service_unavailable", "The database is unreachable.", headers={"Retry-After": "5"}
        )
    try:
        ready = health_service.ready_workers(backends.db, settings)
    except ServiceUnavailable:
        ready = 0
    if ready == 0:
        return error_response(
            503,
            "service_unavailable",
            "No worker has the model loaded yet.",
            headers={"Retry-After": "5"},
        )
    return JSONResponse({"status": "ready", "workers": ready})
