"""Values that pass a loose check and used to fail later, after the task was written and
charged, with a 500 (issue: hardening, finding 1): a `Prefer` header whose digits are not
ASCII or number thousands, a JSON body nested thousands deep or holding an integer of thousands
of digits, a list cursor that decodes to a number past 64 bits. Each gets a documented answer,
and a refused request writes and charges nothing."""

from __future__ import annotations

import base64
import json

import pytest

from tests.api.test_bad_input import assert_error, assert_nothing_written
from tests.support import EXAMPLE_BODY, InProcessApi, auth, background_worker

PRICE_HD = 4


@pytest.mark.parametrize(
    "prefer",
    ["wait=\u00b2", "wait=\u00b9\u00b3", "wait=-1", "wait=1.5", "wait=0x10", "wait="],
    ids=["superscript-two", "superscripts-13", "negative", "decimal", "hex", "empty"],
)
def test_a_prefer_wait_that_is_not_ascii_digits_is_ignored(api: InProcessApi, prefer: str) -> None:
    """RFC 7240: a preference the server cannot read is ignored. The task is taken and charged
    once, and answered at once, as without the header. (Header bytes are read as Latin-1, whose
    superscript digits pass str.isdigit but not int().)"""
    key = api.make_key(credits=40)
    headers = {**auth(key), "Prefer": prefer.encode("latin-1")}
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=headers)
    assert r.status_code == 200, r.text
    assert "preference-applied" not in r.headers
    assert r.json()["data"]["status"] == "IN_PROGRESS"
    acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert acct["balance"] == 40 - PRICE_HD


def test_a_prefer_wait_of_thousands_of_digits_is_capped(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    headers = {**auth(key), "Prefer": "wait=" + "9" * 5000}
    with background_worker(api):
        r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["preference-applied"] == "wait=60"
    assert r.json()["data"]["status"] == "COMPLETED"


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        ('{"prompt": ' + "[" * 20_000 + "]" * 20_000 + "}", "nested"),
        (json.dumps(EXAMPLE_BODY)[:-1] + ', "seed": ' + "7" * 5000 + "}", "digits"),
    ],
    ids=["nested-20000-deep", "integer-of-5000-digits"],
)
def test_a_body_json_cannot_parse_safely_is_400_and_writes_nothing(
    api: InProcessApi, raw: str, what: str
) -> None:
    key = api.make_key(credits=40)
    for path in ("/api/v1/images/generations", "/v1/images/generations"):
        r = api.client.post(
            path, content=raw, headers={**auth(key), "Content-Type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert what in r.text
    r = api.client.post(
        "/api/v1/images/generations",
        content=raw,
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_request")
    assert_nothing_written(api, key, 40)


@pytest.mark.parametrize(
    "value", ["t:" + "9" * 30, "t:-1", "t:" + str(2**63)], ids=["30-digits", "negative", "2^63"]
)
def test_a_cursor_past_the_range_of_a_task_seq_is_400(api: InProcessApi, value: str) -> None:
    key = api.make_key(credits=40)
    cursor = base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")
    r = api.client.get("/api/v1/tasks", params={"cursor": cursor}, headers=auth(key))
    assert_error(r, 400, "invalid_request", "cursor")
