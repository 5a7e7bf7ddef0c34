"""Every bad input gets its status, `type` and `param` in the documented envelope, and
leaves nothing behind: no task, no charge."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.support import EXAMPLE_BODY, InProcessApi, auth


def body(**changes: Any) -> dict[str, Any]:
    out = dict(EXAMPLE_BODY)
    for k, v in changes.items():
        if v is _DROP:
            out.pop(k)
        else:
            out[k] = v
    return out


_DROP = object()

FIELD_CASES = [
    # (case id, body, param)
    ("prompt-1001-chars", body(prompt="x" * 1001), "prompt"),
    ("prompt-empty", body(prompt="   "), "prompt"),
    ("prompt-missing", body(prompt=_DROP), "prompt"),
    ("prompt-not-string", body(prompt=42), "prompt"),
    ("model-missing", body(model=_DROP), "model"),
    ("model-unknown", body(model="dall-e-3"), "model"),
    ("size-1000*1000", body(size="1000*1000"), "size"),
    ("size-0*0", body(size="0*0"), "size"),
    ("size-abc", body(size="abc"), "size"),
    ("size-2048*2048", body(size="2048*2048"), "size"),
    ("size-too-small", body(size="256*256"), "size"),
    ("quality-ultra", body(quality="ultra"), "quality"),
    ("n-0", body(n=0), "n"),
    ("n-99", body(n=99), "n"),
    ("n-string", body(n="2"), "n"),
    ("n-float", body(n=1.5), "n"),
    ("seed-negative", body(seed=-1), "seed"),
    ("seed-too-big", body(seed=2**32), "seed"),
    ("seed-bool", body(seed=True), "seed"),
    ("output-format-gif", body(output_format="gif"), "output_format"),
    ("negative-prompt-1001", body(negative_prompt="y" * 1001), "negative_prompt"),
    # NUL: PostgreSQL cannot store it in text, so it is refused on every backend alike.
    ("prompt-nul", body(prompt="a cat\x00"), "prompt"),
    ("negative-prompt-nul", body(negative_prompt="\x00"), "negative_prompt"),
    ("user-id-nul", body(user_id="u\x00"), "user_id"),
    ("user-id-129", body(user_id="u" * 129), "user_id"),
    ("unknown-field", body(qualty="hd"), "qualty"),
    ("callback-link-local", body(callback_url="http://169.254.169.254/latest/"), "callback_url"),
    ("callback-not-http", body(callback_url="file:///etc/passwd"), "callback_url"),
]


def assert_error(r: httpx.Response, status: int, type_: str, param: str | None = None) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message", "type", "param"}
    assert err["code"] == status
    assert err["type"] == type_
    assert err["param"] == param
    assert isinstance(err["message"], str) and err["message"]


def assert_nothing_written(api: InProcessApi, key: str, balance: int) -> None:
    acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert acct["balance"] == balance
    listed = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]
    assert listed["tasks"] == []


@pytest.mark.parametrize(
    ("payload", "param"), [c[1:] for c in FIELD_CASES], ids=[c[0] for c in FIELD_CASES]
)
def test_bad_field_is_400_with_param_and_writes_nothing(
    api: InProcessApi, payload: dict[str, Any], param: str
) -> None:
    key = api.make_key(credits=40)
    r = api.client.post("/api/v1/images/generations", json=payload, headers=auth(key))
    assert_error(r, 400, "invalid_request", param)
    assert_nothing_written(api, key, 40)


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b'{"model": "cogview-4", "prompt": ', "application/json"),  # malformed
        (b"[1, 2, 3]", "application/json"),  # array
        (b'"just a string"', "application/json"),  # string
        (b"null", "application/json"),
        (b"", "application/json"),
        (b"\xff\xfe", "application/json"),  # not UTF-8
        (json.dumps(EXAMPLE_BODY).encode(), "text/plain"),  # wrong content type
        (b"model=cogview-4&prompt=x", "application/x-www-form-urlencoded"),
    ],
    ids=["malformed", "array", "string", "null", "empty", "not-utf8", "text-plain", "form"],
)
def test_body_that_is_not_a_json_object_is_400(
    api: InProcessApi, content: bytes, content_type: str
) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(
        "/api/v1/images/generations",
        content=content,
        headers={**auth(key), "Content-Type": content_type},
    )
    assert_error(r, 400, "invalid_request")
    assert_nothing_written(api, key, 40)


def test_prompt_with_a_lone_surrogate_is_400(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    r = api.client.post(
        "/api/v1/images/generations",
        content=b'{"model": "cogview-4", "prompt": "a cat \\ud800", "size": "1024*1024"}',
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert_error(r, 400, "invalid_request", "prompt")
    assert_nothing_written(api, key, 40)


def test_body_over_64_kib_is_413(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    big = json.dumps({**EXAMPLE_BODY, "user_id": "x" * (65 * 1024)})
    r = api.client.post(
        "/api/v1/images/generations",
        content=big,
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "request_too_large")
    assert_nothing_written(api, key, 40)


def test_chunked_body_over_64_kib_is_413(api: InProcessApi) -> None:
    key = api.make_key(credits=40)

    def chunks() -> Any:
        for _ in range(70):
            yield b"x" * 1024

    r = api.client.post(
        "/api/v1/images/generations",
        content=chunks(),
        headers={**auth(key), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "request_too_large")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer cv4_nope"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
    ],
    ids=["missing", "empty-bearer", "unknown-key", "basic-auth"],
)
def test_missing_or_wrong_key_is_401(api: InProcessApi, headers: dict[str, str]) -> None:
    for method, path, payload in [
        ("POST", "/api/v1/images/generations", EXAMPLE_BODY),
        ("GET", "/api/v1/tasks/abc_cv4", None),
        ("GET", "/api/v1/tasks", None),
        ("GET", "/api/v1/account", None),
    ]:
        r = api.client.request(method, path, json=payload, headers=headers)
        assert_error(r, 401, "authentication_error")
        assert r.json()["error"]["message"] == "Invalid API key"


def test_revoked_key_is_403_and_submits_nothing(api: InProcessApi) -> None:
    from cogview_api.services import keys as key_service

    key = api.make_key(credits=40)
    (record,) = key_service.list_keys(api.db)
    key_service.revoke_key(api.db, record.id)
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    assert_error(r, 403, "permission_denied")


def test_unknown_route_is_404_envelope(api: InProcessApi) -> None:
    for path in ("/nope", "/api/v1/nope", "/api/v2/images/generations"):
        assert_error(api.client.get(path), 404, "not_found")


def test_wrong_method_is_405_envelope(api: InProcessApi) -> None:
    r = api.client.get("/api/v1/images/generations")
    assert_error(r, 405, "invalid_request")
    assert "POST" in r.headers["allow"]
    assert_error(api.client.delete("/api/v1/account"), 405, "invalid_request")


@pytest.mark.parametrize(
    ("path", "methods"),
    [
        ("/api/v1/batches", {"GET", "POST"}),  # two routes: list and create
        ("/api/v1/images/generations", {"POST"}),
        ("/api/v1/tasks/abc_cv4", {"GET"}),
        ("/openapi.json", {"GET", "HEAD"}),
    ],
)
def test_a_405_allows_every_method_of_the_path(
    api: InProcessApi, path: str, methods: set[str]
) -> None:
    """`Allow` lists all the path's methods, not only those of the first route that matched
    (schemathesis' ST205: OPTIONS /api/v1/batches was answered `Allow: POST`)."""
    r = api.client.options(path)
    assert_error(r, 405, "invalid_request")
    assert {m.strip() for m in r.headers["allow"].split(",")} == methods


def test_insufficient_credits_is_402_and_writes_nothing(api: InProcessApi) -> None:
    key = api.make_key(credits=7)  # one hd image costs 4; two cost 8
    r = api.client.post("/api/v1/images/generations", json=body(n=2), headers=auth(key))
    assert_error(r, 402, "insufficient_credits")
    assert r.json()["error"]["message"] == (
        "Insufficient credits: this request costs 8 credits and the key's balance is 7."
    )
    assert_nothing_written(api, key, 7)


def test_unknown_and_foreign_task_are_404(api: InProcessApi) -> None:
    alice, bob = api.make_key(credits=40, name="alice"), api.make_key(credits=40, name="bob")
    created = api.client.post(
        "/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(alice)
    ).json()["data"]
    assert api.client.get(f"/api/v1/tasks/{created['task_id']}", headers=auth(alice)).is_success
    r = api.client.get(f"/api/v1/tasks/{created['task_id']}", headers=auth(bob))
    assert_error(r, 404, "not_found")
    assert_error(api.client.get("/api/v1/tasks/nope_cv4", headers=auth(alice)), 404, "not_found")
    listed = api.client.get("/api/v1/tasks", headers=auth(bob)).json()["data"]["tasks"]
    assert listed == []


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=abc", "limit"),
        ("status=DONE", "status"),
        ("cursor=%%%", "cursor"),
    ],
)
def test_bad_list_query_is_400(api: InProcessApi, query: str, param: str) -> None:
    key = api.make_key()
    r = api.client.get(f"/api/v1/tasks?{query}", headers=auth(key))
    assert_error(r, 400, "invalid_request", param)


def test_missing_image_is_404(api: InProcessApi) -> None:
    assert_error(api.client.get("/images/doesnotexist.png"), 404, "not_found")


def test_ids_with_a_nul_character_are_a_client_error(api: InProcessApi) -> None:
    # No id can hold a NUL: SQLite finds nothing (404), PostgreSQL refuses the text (400).
    key = api.make_key()
    for r in (
        api.client.get("/api/v1/tasks/a%00b_cv4", headers=auth(key)),
        api.client.get("/images/a%00b.png"),
    ):
        assert r.status_code in (400, 404), r.text
        assert r.json()["error"]["type"] in ("invalid_request", "not_found")
