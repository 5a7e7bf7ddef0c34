"""The HTTP server's own limits (issue: hardening, finding 4: a 32 MiB header was read and
answered, and half-sent headers held the server's memory without a key): header size 431,
header and body read deadlines, idle keep-alive, and the connection cap, all as settings."""

from __future__ import annotations

import json
import select
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import make_settings
from tests.support import InProcessApi, in_process_api

LIMITS = {
    "http_max_header_bytes": 16 * 1024,
    "http_header_timeout_seconds": 0.5,
    "http_body_timeout_seconds": 0.5,
    "http_keep_alive_seconds": 0.5,
    "http_max_connections": 4,
}


@pytest.fixture(scope="module")
def api(
    tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path, sqlite_template: Path
) -> Iterator[InProcessApi]:
    """One server for the module (the store is not under test here: SQLite only)."""
    tmp = tmp_path_factory.mktemp("limits")
    shutil.copyfile(sqlite_template, tmp / "cogview.db")
    with in_process_api(make_settings(tmp, tiny_cache, **LIMITS)) as running:
        yield running


def connect(api: InProcessApi) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", int(api.base_url.rsplit(":", 1)[1])))
    sock.settimeout(10)
    return sock


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a timeout fails the test)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_and_body(answer: bytes) -> tuple[int, dict[str, object], str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    return int(lines[0].split(" ")[1]), json.loads(body), "\r\n".join(lines[1:]).lower()


def test_a_32_mib_header_is_refused_with_431(api: InProcessApi) -> None:
    with connect(api) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent, chunk = 0, b"a" * 65536
        # Sent until the server answers (it must, long before 32 MiB) or all 32 MiB are out.
        while sent < 32 * 1024 * 1024:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sent += sock.send(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
        answer = read_until_closed(sock)
    status, body, headers = status_and_body(answer)
    assert status == 431
    assert "connection: close" in headers
    # The request line was read: the OpenAI surface's envelope.
    assert body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "16384 bytes" in body["error"]["message"]  # type: ignore[index]


def test_half_sent_headers_are_closed_at_the_header_deadline(api: InProcessApi) -> None:
    with connect(api) as sock:
        sock.sendall(b"GET /api/v1/account HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: a")
        status, body, _ = status_and_body(read_until_closed(sock))
    assert status == 408
    assert body["error"]["type"] == "timeout"  # type: ignore[index]


def test_a_silent_connection_is_closed_at_the_header_deadline(api: InProcessApi) -> None:
    with connect(api) as sock:
        status, _, _ = status_and_body(read_until_closed(sock))
    assert status == 408


def test_a_stalled_body_is_closed_at_the_body_deadline(api: InProcessApi) -> None:
    head = (
        b"POST /api/v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with connect(api) as sock:
        sock.sendall(head + b'{"prompt": ')
        assert read_until_closed(sock) == b""  # closed, nothing answered to half a request


def test_an_idle_keep_alive_connection_is_closed(api: InProcessApi) -> None:
    with connect(api) as sock:
        sock.settimeout(3)  # under uvicorn's default of 5 s: the setting is what closes it
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        answer = read_until_closed(sock)  # the answer, then the close once idle
    assert answer.startswith(b"HTTP/1.1 200")
    assert answer.endswith(b'{"status":"ok"}')


def test_connections_past_the_cap_are_answered_503(api: InProcessApi) -> None:
    held = [connect(api) for _ in range(LIMITS["http_max_connections"])]
    try:
        time.sleep(0.1)  # the server has accepted them
        r = httpx.get(api.base_url + "/api/v1/account")
        assert r.status_code == 503
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
        assert "connections" in r.json()["error"]["message"]
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 5
    while (r := httpx.get(api.base_url + "/healthz")).status_code == 503:
        assert time.monotonic() < deadline, "the cap did not free up after the close"
        time.sleep(0.05)
    assert r.status_code == 200
