"""The client's exceptions, one tree:

    CogviewError                      anything this client raises on purpose
    ├── APIError                      the server answered with an error (status, type, code, param)
    │   ├── BadRequest                400 invalid_request: fix the field `param` names
    │   ├── AuthenticationError       401: missing or unknown key
    │   ├── InsufficientCredits       402: balance below the price
    │   ├── PermissionDenied          403: revoked key
    │   ├── NotFound                  404: unknown id, another key's task or batch, no such route
    │   ├── Conflict                  409: Idempotency-Key reused with another body; cancel of
    │   │                             something that already ended
    │   ├── RequestTooLarge           413
    │   ├── RateLimited               429 (after the client's own retries): `retry_after`
    │   ├── ServiceUnavailable        503 (after the client's own retries): `retry_after`
    │   └── ServerError               500 and other 5xx
    ├── ConnectionError               the server could not be reached, or dropped the connection
    │                                 (also a builtins.ConnectionError)
    ├── TimeoutError                  a request, or a wait, took longer than allowed
    │                                 (also a builtins.TimeoutError)
    └── TaskFailed                    `generate` / `wait(..., check=True)`: the task ended FAILED
                                      or CANCELLED; `task` is it, `task.error` says why

httpx's own exceptions never leave the client: they are mapped here, `raise ... from exc`.
"""

from __future__ import annotations

import builtins
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cogview_api.client._models import Task


class CogviewError(Exception):
    """Base of every exception the client raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class APIError(CogviewError):
    """The server answered with an error in the native envelope
    `{"error": {"code", "message", "type", "param"}}`.

    `status` is the HTTP status, `code` the envelope's `code` (the same number on this API),
    `type` the error type (`invalid_request`, `not_found`, ...), `param` the field at fault or
    None, `errors` the per-line list of a refused batch (`[{"index", "param", "message"}]`, else
    empty), `retry_after` the seconds the server asked to wait (429, 503) or None, `body` the
    parsed error object as sent."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        type: str | None = None,
        code: int | str | None = None,
        param: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
        request_id: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.code = code if code is not None else status
        self.param = param
        self.errors = errors or []
        self.retry_after = retry_after
        self.request_id = request_id
        self.body = body or {}

    def __str__(self) -> str:
        where = f" (param: {self.param})" if self.param else ""
        return f"{self.status} {self.type or 'error'}: {self.message}{where}"


class BadRequest(APIError):
    pass


class AuthenticationError(APIError):
    pass


class InsufficientCredits(APIError):
    pass


class PermissionDenied(APIError):
    pass


class NotFound(APIError):
    pass


class Conflict(APIError):
    pass


class RequestTooLarge(APIError):
    pass


class RateLimited(APIError):
    pass


class ServiceUnavailable(APIError):
    pass


class ServerError(APIError):
    pass


class ConnectionError(CogviewError, builtins.ConnectionError):  # noqa: A001
    """The server could not be reached, or closed the connection before answering."""


class TimeoutError(CogviewError, builtins.TimeoutError):  # noqa: A001
    """A request, or a wait for a task or batch, took longer than allowed."""


class TaskFailed(CogviewError):
    """The task ended FAILED or CANCELLED: `task.error` says why, `task.credits.refunded` shows
    the refund."""

    def __init__(self, task: Task) -> None:
        why = task.error.message if task.error else "no reason given"
        super().__init__(f"Task {task.task_id} ended {task.status}: {why}")
        self.task = task


STATUS_ERRORS: dict[int, type[APIError]] = {
    400: BadRequest,
    401: AuthenticationError,
    402: InsufficientCredits,
    403: PermissionDenied,
    404: NotFound,
    409: Conflict,
    413: RequestTooLarge,
    429: RateLimited,
    503: ServiceUnavailable,
}


def error_class(status: int) -> type[APIError]:
    if status in STATUS_ERRORS:
        return STATUS_ERRORS[status]
    return ServerError if status >= 500 else APIError
