"""X-Request-ID: a client's valid id is kept, anything else is replaced by ours; every answer
(errors too) carries it, and the task a request creates remembers it for the worker's logs."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from cogview_api.log_context import ContextFilter
from cogview_api.store import tasks as task_store
from tests.conftest import make_settings
from tests.support import EXAMPLE_BODY, InProcessApi, auth, in_process_api

OURS = re.compile(r"[0-9a-f]{16}")


@pytest.mark.parametrize(
    "sent",
    [
        "5f0c8b1e-3a4d-4c1b-9d2e-7a6b5c4d3e2f",  # a UUID
        "01JDZK3Y7Q8W2F0V6X9N4M1B5C",  # a ULID
        "lb-7:1234/abc+def=",  # a proxy's, with : / + =
        "x" * 128,
    ],
)
def test_a_valid_incoming_request_id_is_kept(api: InProcessApi, sent: str) -> None:
    r = api.client.get("/healthz", headers={"X-Request-ID": sent})
    assert r.headers["x-request-id"] == sent


@pytest.mark.parametrize(
    "sent",
    ["", "has space", 'quote"d', "x" * 129, "ünïcode", "semi;colon", "new\tline"],
)
def test_an_invalid_incoming_request_id_is_replaced_by_ours(api: InProcessApi, sent: str) -> None:
    r = api.client.get("/healthz", headers={"X-Request-ID": sent.encode()})
    assert r.status_code == 200
    assert OURS.fullmatch(r.headers["x-request-id"])


def test_without_one_each_request_gets_its_own(api: InProcessApi) -> None:
    ids = {api.client.get("/healthz").headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5 and all(OURS.fullmatch(i) for i in ids)


def test_error_answers_carry_the_request_id_too(api: InProcessApi) -> None:
    sent = {"X-Request-ID": "req-err-1"}
    answers = [
        api.client.get("/no/such/route", headers=sent),  # 404
        api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=sent),  # 401
        api.client.post("/v1/images/generations", json={}, headers=sent),  # 401, OpenAI envelope
        api.client.post(  # 413, refused before any route
            "/api/v1/images/generations",
            content=b"x" * (api.settings.max_body_bytes + 1),
            headers=sent,
        ),
        api.client.get("/healthz", headers={**sent, "Host": "elsewhere.example"}),  # 200: probe
        api.client.get("/api/v1/account", headers={**sent, "Host": "elsewhere.example"}),  # 400
    ]
    assert [r.status_code for r in answers] == [404, 401, 401, 413, 200, 400]
    assert all(r.headers["x-request-id"] == "req-err-1" for r in answers)


def test_the_task_remembers_the_request_that_created_it(api: InProcessApi) -> None:
    key = api.make_key()
    r = api.client.post(
        "/api/v1/images/generations",
        json=EXAMPLE_BODY,
        headers={**auth(key), "X-Request-ID": "submit-abc"},
    )
    plain = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    with api.db.read() as conn:
        kept = task_store.get_task(conn, r.json()["data"]["task_id"])
        ours = task_store.get_task(conn, plain.json()["data"]["task_id"])
    assert kept.request_id == "submit-abc"
    assert ours.request_id == plain.headers["x-request-id"]
    # Not part of the task object a client sees: the answer's header is where it lives.
    assert "request_id" not in r.json()["data"]


def test_a_bug_is_answered_and_logged_with_the_request_id(
    tmp_path: Path, tiny_cache: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(tmp_path, tiny_cache, access_log=True)
    caplog.handler.addFilter(ContextFilter())  # as configure_logging's handler has it
    with in_process_api(settings) as api, caplog.at_level(logging.INFO):

        def boom() -> None:
            raise RuntimeError("a bug")

        api.app.add_api_route("/boom", boom)
        r = api.client.get("/boom", headers={"X-Request-ID": "boom-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "boom-1"
    assert r.json()["error"]["message"] == "Internal server error (request id boom-1)."
    (bug,) = [rec for rec in caplog.records if rec.name == "cogview_api.api.errors"]
    assert bug.request_id == "boom-1" and bug.exc_info is not None  # type: ignore[attr-defined]
    (line,) = [rec for rec in caplog.records if rec.name == "cogview_api.access"]
    assert line.getMessage().startswith("GET /boom 500 ")
    assert line.request_id == "boom-1"  # type: ignore[attr-defined]
