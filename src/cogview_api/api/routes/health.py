"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request
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
    summary="Database reachable and writable, and a worker has the model loaded",
)
def readyz(request: Request, backends: BackendsDep, settings: SettingsDep) -> Any:
    """Ready when the database answers and takes writes, and a worker is live: one of this
    process's own when it runs workers (`serve`), else any with a fresh heartbeat (`serve
    --workers 0`, the HTTP processes of `--http-processes N`)."""
    if not backends.db.ping():
        return _not_ready("The database is unreachable.")
    try:
        health_service.check_writable(backends.db)
    except ServiceUnavailable:
        return _not_ready("The database cannot take writes.")
    live_workers: Callable[[], int] | None = request.app.state.live_workers
    if live_workers is not None:
        ready = live_workers()
        if ready == 0:
            return _not_ready("No worker of this process is running.")
        return JSONResponse({"status": "ready", "workers": ready})
    try:
        ready = health_service.ready_workers(backends.db, settings)
    except ServiceUnavailable:
        ready = 0
    if ready == 0:
        return _not_ready("No worker has the model loaded yet.")
    return JSONResponse({"status": "ready", "workers": ready})


def _not_ready(reason: str) -> JSONResponse:
    return error_response(503, "service_unavailable", reason, headers={"Retry-After": "5"})
