"""What the sync and the async client share: settings, request bodies, the answer and error
parsing, the retry rule, and the Server-Sent Events decoder. Nothing here does I/O."""

from __future__ import annotations

import email.utils
import json
import os
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from cogview_api import __version__
from cogview_api.client import _errors as errors
from cogview_api.client._models import GenerationRequest

SERVER_ENV = "COGVIEW_SERVER"
API_KEY_ENV = "COGVIEW_API_KEY"
DEFAULT_SERVER = "http://127.0.0.1:8000"
USER_AGENT = f"cogview-api-client/{__version__}"
REPLAYED_HEADER = "Idempotent-Replayed"

# Statuses worth another try: rate limited, the queue full, and a proxy's bad gateway or timeout.
RETRY_STATUSES = frozenset({429, 502, 503, 504})
# Of those, the ones whose answer promises that nothing was done (the server refused the request
# before writing anything), so even a request without an Idempotency-Key may be sent again.
REFUSED_STATUSES = frozenset({429, 503})
# An event stream's read timeout: the server sends a keep-alive comment every 15 s by default.
STREAM_READ_TIMEOUT = 60.0
# A batch submit writes up to 10,000 tasks in one transaction: it may take longer than a submit.
BATCH_TIMEOUT = 120.0


@dataclass(frozen=True)
class RetryPolicy:
    """`max_retries` more attempts after the first; waits double from `backoff` seconds up to
    `backoff_max`, with jitter, or are what the server's `Retry-After` asks, if that is at most
    `max_retry_after` (a longer one is raised as the error at once)."""

    max_retries: int = 4
    backoff: float = 0.5
    backoff_max: float = 8.0
    max_retry_after: float = 60.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float | None:
        """Seconds to wait before retry number `attempt` (0-based), or None: do not retry."""
        if attempt >= self.max_retries:
            return None
        if retry_after is not None:
            return retry_after if retry_after <= self.max_retry_after else None
        base = min(self.backoff * 2.0**attempt, self.backoff_max)
        return base * (0.75 + random.random() / 2)


def default_server(base_url: str | None) -> str:
    return (base_url or os.environ.get(SERVER_ENV) or DEFAULT_SERVER).rstrip("/")


def default_key(api_key: str | None) -> str | None:
    return api_key if api_key is not None else (os.environ.get(API_KEY_ENV) or None)


def base_headers(api_key: str | None) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


def new_idempotency_key() -> str:
    return f"cogview-py-{uuid.uuid4().hex}"


def parse_retry_after(value: str | None) -> float | None:
    """`Retry-After` as seconds: a number, or an HTTP date (RFC 9110)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def may_retry_transport(exc: httpx.TransportError, *, safe: bool) -> bool:
    """A failed connection is retried when the request is safe to send again (a read, or a
    submit with its Idempotency-Key), or when it never left (no connection was made)."""
    if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout):
        return True
    # RemoteProtocolError: the server (or a proxy) closed the connection before answering.
    dropped = httpx.NetworkError | httpx.TimeoutException | httpx.RemoteProtocolError
    return safe and isinstance(exc, dropped)


def may_retry_status(status: int, *, safe: bool) -> bool:
    return status in RETRY_STATUSES and (safe or status in REFUSED_STATUSES)


def transport_error(exc: httpx.TransportError, server: str) -> errors.CogviewError:
    if isinstance(exc, httpx.TimeoutException):
        return errors.TimeoutError(f"The request to {server} timed out ({type(exc).__name__}).")
    if isinstance(exc, httpx.ConnectError):
        return errors.ConnectionError(
            f"Could not connect to {server} ({exc}). Is the server running at that address?"
        )
    return errors.ConnectionError(f"The connection to {server} failed: {type(exc).__name__}: {exc}")


def api_error(response: httpx.Response, *, has_key: bool) -> errors.APIError:
    """The exception for an error answer, from its envelope `{"error": {...}}` (or, for an
    answer that is not ours, e.g. a proxy's HTML page, from its status line)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("error") if isinstance(body, dict) else None
    if not isinstance(detail, dict):
        detail = {}
    status = response.status_code
    message = str(detail.get("message") or f"HTTP {status} {response.reason_phrase}".strip())
    if status == 401 and not has_key:
        message += f" (no key was given: set {API_KEY_ENV}, or pass api_key=)"
    return errors.error_class(status)(
        message,
        status=status,
        type=detail.get("type"),
        code=detail.get("code"),
        param=detail.get("param"),
        errors=detail.get("errors") if isinstance(detail.get("errors"), list) else None,
        retry_after=parse_retry_after(response.headers.get("Retry-After")),
        request_id=response.headers.get("X-Request-ID"),
        body=detail,
    )


def data_of(response: httpx.Response) -> Any:
    """`data` of the native envelope."""
    try:
        body = response.json()
    except ValueError as exc:
        raise errors.ServerError(
            "The server's answer was not JSON.", status=response.status_code
        ) from exc
    if not isinstance(body, dict) or "data" not in body:
        raise errors.ServerError(
            "The server's answer has no `data` field.", status=response.status_code
        )
    return body["data"]


def replayed(response: httpx.Response) -> bool:
    return str(response.headers.get(REPLAYED_HEADER, "")).lower() == "true"


def generation_body(
    prompt: str | GenerationRequest | Mapping[str, Any], fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The submit body: a GenerationRequest, a mapping (sent as it is), or a prompt and fields."""
    if isinstance(prompt, GenerationRequest):
        if any(v is not None for v in fields.values()):
            raise TypeError("give either a GenerationRequest or keyword fields, not both")
        return prompt.body()
    if isinstance(prompt, Mapping):
        return dict(prompt)
    given = {k: v for k, v in fields.items() if v is not None}
    return GenerationRequest(prompt=prompt, **given).body()


def batch_body(
    requests: Sequence[GenerationRequest | Mapping[str, Any] | str],
    callback_url: str | None,
    metadata: Mapping[str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"requests": [generation_body(r, {}) for r in requests]}
    if callback_url is not None:
        body["callback_url"] = callback_url
    if metadata is not None:
        body["metadata"] = dict(metadata)
    return body


def page_params(**params: Any) -> dict[str, Any]:
    return {k: v for k, v in params.items() if v is not None}


def is_absolute(url: str) -> bool:
    return url.startswith(("http://", "https://"))


class SSEDecoder:
    """Server-Sent Events, as the WHATWG spec parses them, from the stream's lines: yields
    `(event, data)` per dispatched event; comments (`: keep-alive`) and `id`/`retry` are read
    and ignored. (Hand-written because the client depends on httpx and pydantic only; the
    server's frames are one `event:` and one `data:` line each.)"""

    def __init__(self) -> None:
        self._event = ""
        self._data: list[str] = []

    def feed(self, line: str) -> tuple[str, str] | None:
        if line == "":
            if not self._data:
                self._event = ""
                return None
            out = (self._event or "message", "\n".join(self._data))
            self._event, self._data = "", []
            return out
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        return None


def decode_frame(event: tuple[str, str] | None, want: str) -> dict[str, Any] | None:
    """The JSON object of a dispatched event named `want`, else None."""
    if event is None or event[0] != want:
        return None
    data = event[1]
    try:
        value = json.loads(data)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def deadline_of(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def poll_delay(interval: float) -> float:
    return interval * (0.8 + random.random() * 0.4)
