"""An httpx transport whose requests end at an overall deadline, not only per operation.

httpx's timeouts bound each connect, write and read, so a receiver that sends a byte every few
seconds keeps one request alive for as long as it likes. Here every socket operation's timeout
is cut to what is left until the deadline of the request running in the calling thread (httpx
and httpcore do a sync request's I/O in its caller's thread), and one past it raises a
timeout right away: the request ends as httpx.ReadTimeout (or Connect/WriteTimeout) then.

httpx has no public way to pass httpcore a network backend, so the transport replaces the
connection pool HTTPTransport builds; tests/integration/test_webhook_deliveries.py (the
dribbling receiver) catches an httpx that stops honouring it.
"""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import httpcore
import httpx

_local = threading.local()


@contextmanager
def deadline(at: float) -> Iterator[None]:
    """Requests made by this thread inside the block end by `at` (time.monotonic())."""
    _local.at = at
    try:
        yield
    finally:
        _local.at = None


def _cut(timeout: float | None, error: type[Exception]) -> float | None:
    at: float | None = getattr(_local, "at", None)
    if at is None:
        return timeout
    left = at - time.monotonic()
    if left <= 0:
        raise error("the attempt's overall deadline passed")
    return left if timeout is None else min(timeout, left)


class _Stream(httpcore.NetworkStream):
    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _cut(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _cut(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _cut(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _Backend(httpcore.NetworkBackend):
    def __init__(self) -> None:
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        timeout = _cut(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_tcp(host, port, timeout, local_address, socket_options))

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        timeout = _cut(timeout, httpcore.ConnectTimeout)
        return _Stream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def transport() -> httpx.HTTPTransport:
    """A direct (no proxy) HTTP/1.1 transport that honours `deadline`."""
    limits = httpx.Limits()  # httpx's defaults: idle connections closed after 5 s
    out = httpx.HTTPTransport(trust_env=False, limits=limits)
    out._pool = httpcore.ConnectionPool(  # noqa: SLF001 - see the module docstring
        ssl_context=httpx.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=_Backend(),
    )
    return out
