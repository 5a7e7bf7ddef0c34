"""The HTTP server's own limits: header size (431), header and body read deadlines, idle
keep-alive, and a cap on open connections, on uvicorn's httptools protocol.

uvicorn has neither a header size limit on httptools (a 32 MiB header is read and answered)
nor a header or body read timeout on either of its parsers. Its h11 parser bounds its buffer,
but costs 0.3 ms more CPU per request (a poll: 0.56 -> 0.85 ms, bench/README.md), so the limits
sit on httptools' parser callbacks instead. The answers these limits give before the app sees a
request are in the native error envelope (or the surface's, when the request line was read),
with `Connection: close`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any, Literal

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from cogview_api.api.errors import ENVELOPES, surface_of
from cogview_api.config import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HttpLimits:
    max_header_bytes: int
    header_timeout: float
    body_timeout: float
    max_connections: int

    @classmethod
    def of(cls, settings: Settings) -> HttpLimits:
        return cls(
            max_header_bytes=settings.http_max_header_bytes,
            header_timeout=settings.http_header_timeout_seconds,
            body_timeout=settings.http_body_timeout_seconds,
            max_connections=settings.http_max_connections,
        )


class HttpConfig(uvicorn.Config):
    """uvicorn's config with our limits; it travels to `--http-processes` children (pickled)."""

    def __init__(self, app: Any, *, limits: HttpLimits, **kwargs: Any) -> None:
        super().__init__(
            app,
            http=LimitedHttpToolsProtocol,
            **kwargs,
        )
        self.limits = limits


def http_config(app: Any, settings: Settings, **kwargs: Any) -> HttpConfig:
    """The uvicorn config of every HTTP server of this service (serve, its HTTP processes,
    the tests' in-process servers)."""
    return HttpConfig(
        app,
        limits=HttpLimits.of(settings),
        timeout_keep_alive=settings.http_keep_alive_seconds,
        **kwargs,
    )


def _error_bytes(status: int, type_: str, message: str, path: str) -> bytes:
    body = json.dumps(ENVELOPES[surface_of(path)](status, type_, message, None)).encode()
    head = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


_REASONS = {
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
}


async def _too_many_connections(scope: Any, receive: Any, send: Any) -> None:
    message = "The server has too many open connections; try again shortly."
    body = json.dumps(
        ENVELOPES[surface_of(scope.get("path", "/"))](503, "service_unavailable", message, None)
    ).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"retry-after", b"1"),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# How long a connection refused mid-request still reads (and drops) before it closes.
LINGER_S = 2.0


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools connection with a header size limit, read deadlines and a cap.

    A read deadline runs while the client owes bytes: from the connection (or the first byte
    after a keep-alive wait) to the end of the request's headers, then from there to the end of
    its body. It is set once per phase, not pushed back by each byte, so a client trickling a
    byte a second gets no longer than one that sends nothing. The header bytes are counted per
    read, so at most the limit plus one read (256 KiB) is held before the 431.
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        limits = getattr(config, "limits", None)
        assert isinstance(limits, HttpLimits), "LimitedHttpToolsProtocol needs an HttpConfig"
        self.limits = limits
        self._owed: Literal["headers", "body", None] = "headers"
        self._header_bytes = 0
        self._read_deadline: asyncio.TimerHandle | None = None
        self._lingering = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            # Its request is read (under the header deadline) and answered 503, then the
            # connection closes: a reset before reading could lose the answer at the client.
            log.warning("over %d open connections: answering 503", self.limits.max_connections)
            self.app = _too_many_connections
        self._set_deadline(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # answered already: what still comes is read and dropped
        super().data_received(data)
        if self._owed != "headers" or self.transport.is_closing():
            return
        self._header_bytes += len(data)
        if self._header_bytes > self.limits.max_header_bytes:
            self._refuse_headers()
        elif self._read_deadline is None:  # the first byte after a keep-alive wait
            self._set_deadline(self.limits.header_timeout)

    # -- parser callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._owed != "headers":
            self._owed, self._header_bytes = "headers", 0
            self._set_deadline(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._owed = "body"
        self._set_deadline(self.limits.body_timeout)

    def handle_websocket_upgrade(self) -> None:
        self._cancel_deadline()  # the connection is the WebSocket protocol's from here
        self._owed = None
        super().handle_websocket_upgrade()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._owed = None
        self._cancel_deadline()

    # -- the limits -----------------------------------------------------------------------

    def _refuse_headers(self) -> None:
        self._cancel_deadline()
        log.warning("request refused: headers over %d bytes", self.limits.max_header_bytes)
        message = f"Request line and headers are larger than {self.limits.max_header_bytes} bytes."
        self._answer_and_close(_error_bytes(431, "request_too_large", message, self._path()))

    def _answer_and_close(self, answer: bytes) -> None:
        """Send `answer` and end our side, then drop what the client still sends for a moment
        before closing: a close with unread bytes resets the connection, and the client's
        system may then discard the answer before the client reads it."""
        self.transport.write(answer)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._lingering = True
        self.loop.call_later(LINGER_S, self.transport.close)

    def _path(self) -> str:
        """The request's path as read so far, for the surface's envelope ('/' if unsure)."""
        url = getattr(self, "url", b"")
        return url.decode("latin-1") if url.startswith(b"/") else "/"

    def _set_deadline(self, seconds: float) -> None:
        self._cancel_deadline()
        self._read_deadline = self.loop.call_later(seconds, self._read_timed_out)

    def _cancel_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        if self.transport.is_closing():
            return
        log.info("connection closed: the request's %s did not arrive in time", self._owed)
        if self._owed == "headers":
            message = "The request's headers did not arrive in time."
            self.transport.write(_error_bytes(408, "timeout", message, self._path()))
        # A body that stalls: the app sees the client go away (its request is not served).
        self.transport.close()
