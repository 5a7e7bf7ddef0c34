"""The error envelopes and the handlers and middleware that produce them.

Three surfaces share one error tree (`cogview_api.errors`); each answers in its own envelope,
chosen from the request path in `error_response`, the one place every error goes through:

    /v1/...          OpenAI   {"error": {"message", "type", "param", "code"}}
    /api/paas/...    Zhipu    {"error": {"code": "1214", "message"}}
    anything else    native   {"error": {"code": <HTTP status>, "message", "type", "param"}}
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cogview_api.errors import (
    CogviewError,
    InvalidBatch,
    InvalidRequest,
    LimitState,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    RequestTooLarge,
    RetryLater,
    TaskFailed,
    WaitTimedOut,
)
from cogview_api.log_context import request_id_var, valid_request_id

log = logging.getLogger(__name__)
access_log = logging.getLogger("cogview_api.access")
# An image's URL holds its capability token: the access line names the route, not the token.
_IMAGE_PREFIX = "/images/"
_MAX_LOGGED_PATH = 200


def loggable_path(path: str) -> str:
    """The request path as the access line may show it: an image's token left out, control
    characters escaped (a percent-decoded `%0A` would otherwise forge a log line), bounded."""
    if path.startswith(_IMAGE_PREFIX):
        return _IMAGE_PREFIX + "<token>"
    shown = path[:_MAX_LOGGED_PATH]
    if not shown.isprintable():
        shown = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in shown)
    return shown + ("..." if len(path) > _MAX_LOGGED_PATH else "")


Surface = Literal["native", "openai", "zhipu"]

# Our wire type -> OpenAI's (type, code). OpenAI answers a bad key with
# invalid_request_error/invalid_api_key and an exhausted balance with insufficient_quota.
OPENAI_ERRORS: dict[str, tuple[str, str | None]] = {
    "invalid_request": ("invalid_request_error", None),
    "authentication_error": ("invalid_request_error", "invalid_api_key"),
    "insufficient_credits": ("insufficient_quota", "insufficient_quota"),
    "rate_limit_exceeded": ("requests", "rate_limit_exceeded"),
    "server_error": ("server_error", None),
    "service_unavailable": ("server_error", "service_unavailable"),
    "timeout": ("server_error", "timeout"),
}

# Our wire type -> Zhipu's business code (docs.bigmodel.cn, "API error codes").
# `invalid_request` depends on the field: see zhipu_code.
ZHIPU_CODES: dict[str, str] = {
    "authentication_error": "1000",
    "insufficient_credits": "1113",
    "permission_denied": "1220",
    "not_found": "1222",
    "rate_limit_exceeded": "1302",
    "service_unavailable": "1305",
}


def surface_of(path: str) -> Surface:
    if path == "/v1" or path.startswith("/v1/"):
        return "openai"
    if path == "/api/paas" or path.startswith("/api/paas/"):
        return "zhipu"
    return "native"


def openai_error(status: int, type_: str, message: str, param: str | None) -> dict[str, Any]:
    fallback = ("server_error" if status >= 500 else "invalid_request_error", type_)
    openai_type, code = OPENAI_ERRORS.get(type_, fallback)
    return {"error": {"message": message, "type": openai_type, "param": param, "code": code}}


def zhipu_code(status: int, type_: str, param: str | None) -> str:
    if type_ == "invalid_request":
        if param == "model":
            return "1211"  # model does not exist
        return "1214" if param else "1210"  # bad field / bad call
    return ZHIPU_CODES.get(type_, "500" if status >= 500 else "1210")


def zhipu_error(status: int, type_: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"code": zhipu_code(status, type_, param), "message": message}}


def native_error(status: int, type_: str, message: str, param: str | None) -> dict[str, Any]:
    return {"error": {"code": status, "message": message, "type": type_, "param": param}}


ENVELOPES: dict[Surface, Callable[[int, str, str, str | None], dict[str, Any]]] = {
    "native": native_error,
    "openai": openai_error,
    "zhipu": zhipu_error,
}


def error_response(
    status: int,
    type_: str,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
    *,
    path: str = "/",
) -> JSONResponse:
    """An error in the envelope of the surface that `path` belongs to."""
    body = ENVELOPES[surface_of(path)](status, type_, message, param)
    return JSONResponse(body, status_code=status, headers=headers)


def ratelimit_headers(limits: Sequence[LimitState]) -> dict[str, str]:
    """The IETF RateLimit header fields (draft-ietf-httpapi-ratelimit-headers-11: Structured
    Field lists, one item per policy) of a key's limits, e.g.
    `RateLimit-Policy: "submits";q=50;w=5, "waiting";q=100` and
    `RateLimit: "submits";r=49;t=1, "waiting";r=99`. None: no fields."""
    if not limits:
        return {}
    policies, states = [], []
    for limit in limits:
        window = "" if limit.window is None else f";w={limit.window}"
        reset = "" if limit.reset is None else f";t={limit.reset}"
        policies.append(f'"{limit.name}";q={limit.quota}{window}')
        states.append(f'"{limit.name}";r={limit.remaining}{reset}')
    return {"RateLimit-Policy": ", ".join(policies), "RateLimit": ", ".join(states)}


def from_exception(exc: CogviewError, path: str) -> JSONResponse:
    headers = None
    if isinstance(exc, RetryLater):
        headers = {"Retry-After": str(exc.retry_after)}
    if isinstance(exc, RateLimited):
        headers = {"Retry-After": str(exc.retry_after), **ratelimit_headers(exc.limits)}
    if isinstance(exc, TaskFailed | WaitTimedOut):
        # The OpenAI and Zhipu SDKs retry 5xx answers unless told not to; a retry would start
        # (and charge) another generation while a late task is still running.
        headers = {"x-should-retry": "false"}
    if isinstance(exc, InvalidBatch) and surface_of(path) == "native":
        body = native_error(exc.status, exc.type, exc.message, exc.param)
        body["error"]["errors"] = [
            {"index": e.index, "param": e.param, "message": e.message} for e in exc.errors
        ]
        return JSONResponse(body, status_code=exc.status)
    return error_response(exc.status, exc.type, exc.message, exc.param, headers, path=path)


def invalid_from_validation(exc: ValidationError | RequestValidationError) -> InvalidRequest:
    """The first problem of a pydantic error, as a sentence naming the field."""
    first: Any = exc.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        return InvalidRequest(f"Unknown field '{param}'.", param=param)
    if kind == "missing":
        return InvalidRequest(f"Field '{param}' is required.", param=param)
    msg = str(first.get("msg", "is invalid")).removeprefix("Value error, ")
    return InvalidRequest(f"Invalid '{param}': {msg}.", param=param)


# The methods a 405's `Allow` can name (OPTIONS has no route: it is always a 405).
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def _allowed_methods(request: Request) -> list[str]:
    """Every method the app answers on this path: the request tried with each method against
    the app's routes (static mounts aside: they answer their own 405s). Starlette's 405 names
    only the methods of the first route whose path matched, and FastAPI makes a route per
    method, so `Allow` for /api/v1/batches said POST and left out GET."""
    routes = [r for r in request.app.router.routes if not isinstance(r, Mount)]
    return [
        method
        for method in _METHODS
        if any(r.matches({**request.scope, "method": method})[0] is Match.FULL for r in routes)
    ]


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CogviewError)
    async def _ours(request: Request, exc: CogviewError) -> Response:
        return from_exception(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return from_exception(invalid_from_validation(exc), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        path = request.url.path
        if exc.status_code == 404:
            return from_exception(NotFound(f"No route for {request.method} {path}."), path)
        if exc.status_code == 405:
            resp = from_exception(
                MethodNotAllowed(f"Method {request.method} is not allowed on {path}."), path
            )
            allowed = _allowed_methods(request)
            if allowed:
                resp.headers["Allow"] = ", ".join(allowed)
            elif exc.headers and "allow" in {k.lower() for k in exc.headers}:
                resp.headers.update(exc.headers)
            return resp
        return error_response(exc.status_code, "invalid_request", str(exc.detail), path=path)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> Response:
        # Starlette runs this outside RequestGuard: the id goes on the line and the answer here.
        rid = request.scope.get("state", {}).get("request_id", "-")
        log.exception("unhandled error, request id %s", rid, extra={"request_id": rid})
        return error_response(
            500,
            "server_error",
            f"Internal server error (request id {rid}).",
            headers={"X-Request-ID": rid},
            path=request.url.path,
        )


class RequestGuard:
    """Pure ASGI middleware: gives each request an id (a valid incoming `X-Request-ID`, else
    ours), binds it for the request's log lines and returns it on every answer; refuses bodies
    over the limit with 413 before any route sees them (also for chunked bodies with no
    Content-Length); with `access_log`, one info line per request once it is answered."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        allowed_hosts: frozenset[str] | None = None,
        access_log: bool = False,
        body_limits: dict[str, int] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        # Paths with a limit of their own (POST /api/v1/batches: COGVIEW_BATCH_MAX_BODY_BYTES).
        self.body_limits = body_limits or {}
        self.allowed_hosts = allowed_hosts
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        # A request id names a request in logs and answers; it guards nothing, so ours comes
        # from the process's Mersenne Twister (reseeded by Python in a forked child), not the
        # OS's random source: secrets.token_hex was a system call per request, 5% of a poll's CPU.
        rid = valid_request_id(headers.get(b"x-request-id")) or f"{random.getrandbits(64):016x}"
        scope.setdefault("state", {})["request_id"] = rid
        token = request_id_var.set(rid)
        try:
            if self.access_log:
                await self._logged(scope, receive, send, headers, rid)
            else:
                await self._guarded(scope, receive, send, headers, rid)
        finally:
            request_id_var.reset(token)

    async def _logged(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], rid: str
    ) -> None:
        started = time.perf_counter()
        status = 0

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_seen, headers, rid)
        except Exception:
            status = status or 500  # answered by the 500 handler, outside this middleware
            raise
        finally:
            path = loggable_path(scope["path"])
            access_log.info(
                "%s %s %s %.1f ms",
                scope["method"],
                path,
                status or "-",
                (time.perf_counter() - started) * 1000,
                extra={"method": scope["method"], "path": path, "status": status},
            )

    async def _guarded(
        self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes], rid: str
    ) -> None:
        header = (b"x-request-id", rid.encode())

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], header]
            await send(message)

        if self.allowed_hosts is not None and scope["path"] not in UNCHECKED_HOST_PATHS:
            host = _host_name(headers.get(b"host", b""))
            if host not in self.allowed_hosts:
                await from_exception(
                    InvalidRequest(
                        f"This server does not answer for the host {host!r} (its image URLs "
                        "would point there); the operator sets COGVIEW_PUBLIC_URL or "
                        "COGVIEW_TRUSTED_HOSTS.",
                        param="Host",
                    ),
                    scope["path"],
                )(scope, _no_receive, send_with_id)
                return
        declared = headers.get(b"content-length")
        limit = self.body_limits.get(scope["path"], self.max_body_bytes)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._too_large(scope, send_with_id, limit)
            return
        if scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE") and declared is None:
            await self.app(scope, receive, send_with_id)
            return
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                await self._too_large(scope, send_with_id, limit)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send_with_id)

    async def _too_large(
        self, scope: Scope, send: Callable[[Message], Awaitable[None]], limit: int
    ) -> None:
        resp = from_exception(
            RequestTooLarge(f"Request body is larger than {limit} bytes."),
            scope["path"],
        )
        resp.headers["connection"] = "close"
        await resp(scope, _no_receive, send)


# Probes and scrapers reach a replica by its address (Kubernetes, compose, Prometheus) and
# their answers hold no URL.
UNCHECKED_HOST_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _host_name(raw: bytes) -> str:
    """The name in a Host header, lower-case, without its port: `[::1]:8000` -> `::1`."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
