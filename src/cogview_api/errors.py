"""The service's exceptions: one tree, each class knowing its HTTP status and wire `type`.

    CogviewError
    ├── InvalidRequest            400 invalid_request      (bad JSON, bad or unknown field)
    │   └── InvalidBatch          400 invalid_request      (bad lines of a batch, each listed)
    ├── AuthenticationFailed      401 authentication_error (missing or unknown key)
    ├── InsufficientCredits       402 insufficient_credits
    ├── PermissionDenied          403 permission_denied    (revoked key, admin route)
    ├── NotFound                  404 not_found            (route, task, image, another key's task)
    ├── MethodNotAllowed          405 invalid_request
    ├── Conflict                  409 conflict
    ├── RequestTooLarge           413 request_too_large
    ├── RateLimited               429 rate_limit_exceeded  (a key over its submit rate or waiting)
    ├── ServiceUnavailable        503 service_unavailable  (queue full, no engine, database down)
    │   └── StorageError          503 service_unavailable  (the image store failed or is down)
    ├── TaskFailed                500 server_error         (a synchronous request's task failed)
    │   └── TaskCancelled         409 conflict             (... or was cancelled meanwhile)
    ├── WaitTimedOut              504 timeout              (a synchronous request's task is late)
    ├── StartError                (serve/worker cannot start: its port is taken; the CLI exits 2)
    └── EngineError               500 server_error         (raised by engines; fails one task)
        ├── EngineOutOfMemory
        └── EngineLoadError       (model cannot be loaded; the CLI prints it and exits)

Anything else that escapes to the API is a bug: 500 server_error, logged with a request id.
"""

from __future__ import annotations

from dataclasses import dataclass


class CogviewError(Exception):
    status: int = 500
    type: str = "server_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(CogviewError):
    status = 400
    type = "invalid_request"


@dataclass(frozen=True)
class LineError:
    """One bad line of a batch: its 0-based index, the field, and what is wrong."""

    index: int
    param: str | None
    message: str


class InvalidBatch(InvalidRequest):
    """A batch with bad lines: refused whole, every bad line listed in `errors`."""

    def __init__(self, errors: list[LineError]) -> None:
        first = errors[0]
        more = f" (and {len(errors) - 1} more bad lines)" if len(errors) > 1 else ""
        super().__init__(
            f"Line {first.index}: {first.message}{more}; the batch was not created.",
            param="requests",
        )
        self.errors = errors


class AuthenticationFailed(CogviewError):
    status = 401
    type = "authentication_error"

    def __init__(self, message: str = "Invalid API key") -> None:
        super().__init__(message)


class InsufficientCredits(CogviewError):
    status = 402
    type = "insufficient_credits"


class PermissionDenied(CogviewError):
    status = 403
    type = "permission_denied"


class NotFound(CogviewError):
    status = 404
    type = "not_found"


class MethodNotAllowed(CogviewError):
    status = 405
    type = "invalid_request"


class Conflict(CogviewError):
    status = 409
    type = "conflict"


class RequestTooLarge(CogviewError):
    status = 413
    type = "request_too_large"


class RetryLater(CogviewError):
    """Refused for now: the answer carries `Retry-After: retry_after` (seconds)."""

    def __init__(self, message: str, *, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class LimitState:
    """One per-key limit as an answer reports it (the API renders these as the IETF
    `RateLimit-Policy` and `RateLimit` headers): its name, its quota over `window` seconds
    (None: not a quota over time, e.g. waiting tasks), what is left of it, and in how many
    seconds it is whole again (None: when tasks start, not at a known time)."""

    name: str
    quota: int
    window: int | None
    remaining: int
    reset: int | None


class RateLimited(RetryLater):
    """This key is over one of its limits; `limits`: the state of the key's limits."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(
        self, message: str, *, retry_after: int = 5, limits: tuple[LimitState, ...] = ()
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.limits = limits


class ServiceUnavailable(RetryLater):
    status = 503
    type = "service_unavailable"


class StorageError(ServiceUnavailable):
    """The image store (S3 or the like) failed or cannot be reached. A worker that meets it
    fails the task with a refund; an image download answers 503."""


class TaskFailed(CogviewError):
    """The task behind a synchronous request (OpenAI, Zhipu surfaces) ended without images;
    its credits were refunded when it did."""

    status = 500
    type = "server_error"


class TaskCancelled(TaskFailed):
    """The task behind a synchronous request was cancelled (from the native API) meanwhile."""

    status = 409
    type = "conflict"


class WaitTimedOut(CogviewError):
    """The task behind a synchronous request did not finish in time. It goes on running (and
    stays charged): the message names it so the client can fetch it from the native API."""

    status = 504
    type = "timeout"


class StartError(CogviewError):
    """The service cannot start as configured (its port is taken); never reaches HTTP."""


class EngineError(CogviewError):
    """A generation failed inside the engine; the task fails and is refunded."""

    status = 500
    type = "server_error"


class EngineOutOfMemory(EngineError):
    pass


class EngineLoadError(EngineError):
    """The model cannot be loaded here; the message says what to do instead."""
