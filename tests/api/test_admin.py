"""The admin API (/admin/v1) over HTTP, on SQLite and PostgreSQL: the token guards every route,
keys and credits change only through ledger rows, every action leaves an audit row, and the
usage reports and the ledger export add up to the ledger, to the credit."""

from __future__ import annotations

import csv
import io
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, text

from cogview_api.services import usage as usage_service
from cogview_api.store.tables import admin_audit, images, ledger, tasks
from tests.conftest import make_settings
from tests.support import (
    EXAMPLE_BODY,
    InProcessApi,
    auth,
    background_worker,
    complete_next_task,
    in_process_api,
    sse_items,
)

TOKEN = "adm_" + "x7Kq2P9vLm4Rt8Wz" * 3
ADMIN = auth(TOKEN)
KEY_ROUTES = [
    ("get", "/admin/v1/keys/{id}"),
    ("post", "/admin/v1/keys/{id}/revoke"),
    ("post", "/admin/v1/keys/{id}/webhook-secret"),
    ("post", "/admin/v1/keys/{id}/credits/grant"),
    ("post", "/admin/v1/keys/{id}/credits/adjust"),
    ("get", "/admin/v1/keys/{id}/ledger"),
    ("get", "/admin/v1/keys/{id}/limits"),
    ("put", "/admin/v1/keys/{id}/limits"),
]
ALL_ROUTES = [
    ("post", "/admin/v1/keys"),
    ("get", "/admin/v1/keys"),
    *KEY_ROUTES,
    ("get", "/admin/v1/usage"),
    ("get", "/admin/v1/ledger/export"),
    ("get", "/admin/v1/audit"),
]


@pytest.fixture
def admin_api(tmp_path: Path, tiny_cache: Path, database_url: str) -> Iterator[InProcessApi]:
    settings = make_settings(
        tmp_path,
        tiny_cache,
        database_url=database_url,
        admin_token=TOKEN,
        admin_token_name="ops",
    )
    with in_process_api(settings) as running:
        yield running


def native_error(r: httpx.Response, status: int, type_: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body.keys() == {"error"}
    assert body["error"].keys() == {"code", "message", "type", "param"}
    assert body["error"]["code"] == status and body["error"]["type"] == type_
    return body["error"]


def data(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    return body["data"]


def create_key(api: InProcessApi, name: str = "acme", credits: int = 0) -> dict[str, Any]:
    made: dict[str, Any] = data(
        api.client.post("/admin/v1/keys", json={"name": name, "credits": credits}, headers=ADMIN)
    )
    return made


def audit_rows(api: InProcessApi) -> list[tuple[str, str, str | None]]:
    with api.db.read() as conn:
        rows = conn.execute(
            select(admin_audit.c.actor, admin_audit.c.action, admin_audit.c.key_id).order_by(
                admin_audit.c.id
            )
        ).all()
    return [(r.actor, r.action, r.key_id) for r in rows]


NO_LIMITS = "Give submit_rate, submit_burst, max_waiting, max_streams or max_waits, or reset: true."


@contextmanager
def open_stream(api: InProcessApi, key: str, task_id: str) -> Iterator[None]:
    """A task's event stream whose first frame has arrived (so the server holds it open)."""
    with (
        httpx.Client(base_url=api.base_url, timeout=30) as c,
        c.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r,
    ):
        assert r.status_code == 200, r.read()
        items = sse_items(r)  # kept: a dropped reader closes the stream
        assert next(items)[0] == "task"
        yield


def submit(api: InProcessApi, key: str, **changes: Any) -> str:
    r = api.client.post(
        "/api/v1/images/generations", json={**EXAMPLE_BODY, **changes}, headers=auth(key)
    )
    task_id: str = data(r)["task_id"]
    return task_id


# -- the token ----------------------------------------------------------------------------


def test_admin_routes_do_not_exist_without_a_token(api: InProcessApi) -> None:
    r = api.client.get("/admin/v1/keys", headers=ADMIN)
    native_error(r, 404, "not_found")
    assert "/admin/v1/keys" not in api.client.get("/openapi.json").json()["paths"]


def test_every_route_refuses_a_missing_or_wrong_token_with_401(admin_api: InProcessApi) -> None:
    key = create_key(admin_api, credits=10)
    before = audit_rows(admin_api)
    paths = admin_api.client.get("/openapi.json").json()["paths"]
    served = {(m, p) for p, item in paths.items() if p.startswith("/admin/") for m in item}
    assert served == {(m, p.replace("{id}", "{key_id}")) for m, p in ALL_ROUTES}
    wrong = [
        {},
        auth(TOKEN[:-1] + "y"),
        auth(TOKEN + "y"),
        auth(TOKEN[:-1]),
        {"Authorization": TOKEN},  # no scheme
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": b"Bearer " + "é".encode("latin-1") * 40},
    ]
    for method, path in ALL_ROUTES:
        url = path.replace("{id}", key["id"])
        for headers in wrong:
            # A body that would be valid: the token is checked before it is read.
            r = admin_api.client.request(method, url, headers=headers, json={"amount": 5})
            error = native_error(r, 401, "authentication_error")
            assert error["message"] == "Invalid admin token."
        # An API key is known, but has no admin rights.
        r = admin_api.client.request(method, url, headers=auth(key["key"]), json={"amount": 5})
        native_error(r, 403, "permission_denied")
    # Nothing was done, nothing was logged, the balance is untouched.
    assert audit_rows(admin_api) == before
    assert data(admin_api.client.get(f"/admin/v1/keys/{key['id']}", headers=ADMIN))["balance"] == 10


def test_a_token_under_32_characters_is_refused_at_start(tmp_path: Path, tiny_cache: Path) -> None:
    with pytest.raises(ValueError, match="at least 32 characters"):
        make_settings(tmp_path, tiny_cache, admin_token="x" * 31)
    with pytest.raises(ValueError, match="printable ASCII"):
        make_settings(tmp_path, tiny_cache, admin_token="x" * 31 + " y")
    with pytest.raises(ValueError, match="admin_token_name"):
        make_settings(tmp_path, tiny_cache, admin_token="x" * 32, admin_token_name="two words")
    assert make_settings(tmp_path, tiny_cache, admin_token="x" * 32).admin_token_name == "admin"


# -- keys ---------------------------------------------------------------------------------


def test_key_lifecycle_through_the_admin_api(admin_api: InProcessApi) -> None:
    c = admin_api.client
    made = create_key(admin_api, name="  acme  ", credits=12)
    assert made["key"].startswith("cv4_") and made["webhook_secret"].startswith("whsec_")
    assert made["name"] == "acme" and made["balance"] == 12 and made["revoked"] is False
    key_id, secret = made["id"], made["key"]
    assert data(c.get("/api/v1/account", headers=auth(secret)))["balance"] == 12

    listed = data(c.get("/admin/v1/keys", headers=ADMIN))["keys"]
    assert [k["id"] for k in listed] == [key_id]
    assert "key" not in listed[0] and "webhook_secret" not in listed[0]  # never shown again
    got = data(c.get(f"/admin/v1/keys/{key_id}", headers=ADMIN))
    assert got == {k: v for k, v in made.items() if k not in ("key", "webhook_secret")}

    rotated = data(c.post(f"/admin/v1/keys/{key_id}/webhook-secret", headers=ADMIN))
    assert rotated["key_id"] == key_id
    assert rotated["webhook_secret"].startswith("whsec_")
    assert rotated["webhook_secret"] != made["webhook_secret"]

    task_id = submit(admin_api, secret)  # waiting: the revoke cancels and refunds it
    revoked = data(c.post(f"/admin/v1/keys/{key_id}/revoke", headers=ADMIN))
    assert revoked["revoked"] is True and revoked["revoked_at"] and revoked["balance"] == 12
    native_error(c.get("/api/v1/account", headers=auth(secret)), 403, "permission_denied")
    with admin_api.db.read() as conn:
        state = conn.execute(select(tasks.c.state).where(tasks.c.id == task_id)).scalar_one()
    assert state == "cancelled"

    assert audit_rows(admin_api) == [
        ("ops", "keys.create", key_id),
        ("ops", "keys.list", None),
        ("ops", "keys.get", key_id),
        ("ops", "keys.rotate_webhook_secret", key_id),
        ("ops", "keys.revoke", key_id),
    ]
    log = data(c.get("/admin/v1/audit", params={"limit": 3}, headers=ADMIN))
    # Newest first; reading the log is logged too, first.
    assert [e["action"] for e in log["entries"]] == [
        "audit.read",
        "keys.revoke",
        "keys.rotate_webhook_secret",
    ]
    assert log["entries"][1]["detail"] == {"tasks_cancelled": 1}
    assert log["entries"][0]["actor"] == "ops" and log["has_more"] is True
    rest = data(c.get("/admin/v1/audit", params={"cursor": log["next_cursor"]}, headers=ADMIN))
    assert [e["action"] for e in rest["entries"]] == ["keys.get", "keys.list", "keys.create"]
    assert rest["entries"][-1]["detail"] == {"name": "acme", "credits": 12}
    assert rest["has_more"] is False and rest["next_cursor"] is None
    assert secret not in json.dumps(log) + json.dumps(rest)


def test_unknown_keys_are_404_on_every_key_route(admin_api: InProcessApi) -> None:
    for method, path in KEY_ROUTES:
        # A body the route would take for a known key.
        body = {"submit_burst": 3} if path.endswith("/limits") else {"amount": 5}
        for key_id in ("key_0000000000000000", "x" * 200, "nul%00here"):
            r = admin_api.client.request(
                method, path.replace("{id}", key_id), headers=ADMIN, json=body
            )
            if "%00" in key_id and r.status_code == 400:
                continue  # PostgreSQL cannot hold NUL: refused as a bad input, not a 500
            native_error(r, 404, "not_found")
    for path in ("/admin/v1/usage", "/admin/v1/ledger/export"):
        r = admin_api.client.get(path, params={"key_id": "key_nope"}, headers=ADMIN)
        native_error(r, 404, "not_found")
    assert audit_rows(admin_api) == []  # nothing happened


# -- credits ------------------------------------------------------------------------------


def test_grants_and_adjustments_are_ledger_rows(admin_api: InProcessApi) -> None:
    c = admin_api.client
    key = create_key(admin_api)
    url = f"/admin/v1/keys/{key['id']}/credits"
    granted = data(c.post(f"{url}/grant", json={"amount": 100, "note": "inv 7"}, headers=ADMIN))
    assert granted["key"]["balance"] == 100
    entry = granted["entry"]
    assert (entry["kind"], entry["amount"], entry["note"]) == ("grant", 100, "inv 7")
    assert entry["key_id"] == key["id"] and entry["task_id"] is None
    adjusted = data(c.post(f"{url}/adjust", json={"amount": -30}, headers=ADMIN))
    assert adjusted["key"]["balance"] == 70 and adjusted["entry"]["kind"] == "adjust"
    assert data(c.post(f"{url}/adjust", json={"amount": 5}, headers=ADMIN))["key"]["balance"] == 75

    below = c.post(f"{url}/adjust", json={"amount": -76}, headers=ADMIN)
    assert native_error(below, 400, "invalid_request")["param"] == "amount"
    for amount in (0, -1):
        r = c.post(f"{url}/grant", json={"amount": amount}, headers=ADMIN)
        assert native_error(r, 400, "invalid_request")["param"] == "amount"
    zero = c.post(f"{url}/adjust", json={"amount": 0}, headers=ADMIN)
    assert native_error(zero, 400, "invalid_request")["param"] == "amount"

    with admin_api.db.read() as conn:
        rows = conn.execute(
            select(ledger.c.kind, ledger.c.amount).where(ledger.c.key_id == key["id"])
        ).all()
    assert [(r.kind, r.amount) for r in rows] == [("grant", 100), ("adjust", -30), ("adjust", 5)]
    page = data(c.get(f"/admin/v1/keys/{key['id']}/ledger", headers=ADMIN))
    assert [e["amount"] for e in page["entries"]] == [5, -30, 100]
    assert [a for _, a, _ in audit_rows(admin_api)] == [
        "keys.create",
        "credits.grant",
        "credits.adjust",
        "credits.adjust",
        "ledger.read",
    ]


def test_concurrent_grants_are_exact(admin_api: InProcessApi) -> None:
    key = create_key(admin_api, credits=1)
    url = f"{admin_api.base_url}/admin/v1/keys/{key['id']}/credits/grant"
    threads, grants = 8, 10
    failures: list[str] = []

    def grant_many(n: int) -> None:
        with httpx.Client(timeout=60) as client:
            for i in range(grants):
                r = client.post(url, json={"amount": n * 100 + i + 1}, headers=ADMIN)
                if r.status_code != 200:
                    failures.append(r.text)

    workers = [threading.Thread(target=grant_many, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert failures == []
    expected = 1 + sum(n * 100 + i + 1 for n in range(threads) for i in range(grants))
    got = data(admin_api.client.get(f"/admin/v1/keys/{key['id']}", headers=ADMIN))
    assert got["balance"] == expected
    with admin_api.db.read() as conn:
        total = conn.execute(
            select(func.sum(ledger.c.amount), func.count()).where(ledger.c.key_id == key["id"])
        ).one()
        logged = conn.execute(
            select(func.count()).where(admin_audit.c.action == "credits.grant")
        ).scalar_one()
    assert (total[0], total[1]) == (expected, threads * grants + 1)
    assert logged == threads * grants


# -- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "kwargs", "param"),
    [
        ("post", "/admin/v1/keys", {"content": b"{not json"}, None),
        ("post", "/admin/v1/keys", {"content": b"[]"}, None),
        ("post", "/admin/v1/keys", {"json": {"name": "a", "credit": 5}}, "credit"),
        ("post", "/admin/v1/keys", {"json": {"name": "a", "credits": "5"}}, "credits"),
        ("post", "/admin/v1/keys", {"json": {"name": "a", "credits": -1}}, "credits"),
        ("post", "/admin/v1/keys", {"json": {"name": "a", "credits": 10**16}}, "credits"),
        ("post", "/admin/v1/keys", {"json": {"name": "   "}}, "name"),
        ("post", "/admin/v1/keys", {"json": {"name": "a\x00b"}}, "name"),
        ("post", "/admin/v1/keys", {"json": {}}, "name"),
        ("post", "/admin/v1/keys", {"data": {"name": "a"}}, None),  # a form, not JSON
        ("post", "{key}/credits/grant", {"json": {"amount": 1.5}}, "amount"),
        ("post", "{key}/credits/grant", {"json": {"amount": 10**20}}, "amount"),
        ("post", "{key}/credits/grant", {"json": {"amount": 1, "note": "n" * 201}}, "note"),
        ("post", "{key}/credits/adjust", {"json": {"note": "x"}}, "amount"),
        ("get", "/admin/v1/usage", {"params": {"from": "2026-13-01"}}, "from"),
        ("get", "/admin/v1/usage", {"params": {"to": "yesterday"}}, "to"),
        ("get", "/admin/v1/usage", {"params": {"from": "2026-11-02", "to": "2026-11-01"}}, "from"),
        ("get", "/admin/v1/usage", {"params": {"from": "2024-01-01", "to": "2026-01-01"}}, "from"),
        ("get", "/admin/v1/ledger/export", {"params": {"format": "xml"}}, "format"),
        ("get", "/admin/v1/ledger/export", {"params": {"from": "20261101"}}, "from"),
        ("get", "/admin/v1/audit", {"params": {"limit": 0}}, "limit"),
        ("get", "/admin/v1/audit", {"params": {"limit": "many"}}, "limit"),
        ("get", "/admin/v1/audit", {"params": {"cursor": "bogus"}}, "cursor"),
        ("get", "{key}/ledger", {"params": {"limit": 101}}, "limit"),
        ("get", "/api/v1/usage", {"params": {"from": "2026-02-30"}}, "from"),
        # An ISO week date: Python reads it as a day, the schema's `format: date` does not.
        ("get", "/api/v1/usage", {"params": {"from": "2026-W49-3"}}, "from"),
        # Days whose range arithmetic leaves what a date holds (an OverflowError, a 500, before).
        ("get", "/api/v1/usage", {"params": {"to": "0001-01-05"}}, "to"),
        ("get", "/admin/v1/usage", {"params": {"to": "9999-12-31"}}, "to"),
        ("get", "/admin/v1/ledger/export", {"params": {"to": "9999-12-31"}}, "to"),
        # A positive adjustment is held to the ceiling as a grant is.
        ("post", "{key}/credits/adjust", {"json": {"amount": 10**15}}, "amount"),
        ("get", "/api/v1/ledger", {"params": {"cursor": "dDox"}}, "cursor"),  # a task cursor
    ],
)
def test_bad_input_is_400_in_the_native_envelope(
    admin_api: InProcessApi, method: str, path: str, kwargs: dict[str, Any], param: str | None
) -> None:
    key = create_key(admin_api, credits=3)
    path = path.replace("{key}", f"/admin/v1/keys/{key['id']}")
    headers = auth(key["key"]) if path.startswith("/api/") else ADMIN
    r = admin_api.client.request(method, path, headers=headers, **kwargs)
    error = native_error(r, 400, "invalid_request")
    assert error["param"] == param, error
    assert data(admin_api.client.get(f"/admin/v1/keys/{key['id']}", headers=ADMIN))["balance"] == 3


# -- per-key limits -----------------------------------------------------------------------


def test_a_keys_limits_are_read_set_and_reset_and_hold_from_its_next_submit(
    admin_api: InProcessApi,
) -> None:
    c = admin_api.client
    key = create_key(admin_api, credits=100)
    url = f"/admin/v1/keys/{key['id']}/limits"
    defaults = {
        "key_id": key["id"],
        "submit_rate": 10.0,
        "submit_burst": 50,
        "max_waiting": 100,
        "max_streams": 20,
        "max_waits": 20,
        "own": [],
    }
    assert data(c.get(url, headers=ADMIN)) == defaults

    # A rate so slow nothing refills during the test: the burst alone decides.
    got = data(c.put(url, json={"submit_rate": 0.001, "submit_burst": 2}, headers=ADMIN))
    assert got == {
        **defaults,
        "submit_rate": 0.001,
        "submit_burst": 2,
        "own": ["submit_burst", "submit_rate"],
    }
    assert data(c.get(url, headers=ADMIN)) == got
    body = EXAMPLE_BODY
    first = c.post("/api/v1/images/generations", json=body, headers=auth(key["key"]))
    assert first.status_code == 200, first.text
    assert first.headers["ratelimit-policy"].startswith('"submits";q=2;')
    assert c.post("/api/v1/images/generations", json=body, headers=auth(key["key"])).is_success
    third = c.post("/api/v1/images/generations", json=body, headers=auth(key["key"]))
    native_error(third, 429, "rate_limit_exceeded")

    # Another value later keeps the first ones, and the rate's state: still over it.
    got = data(c.put(url, json={"max_waiting": 7}, headers=ADMIN))
    assert got["own"] == ["max_waiting", "submit_burst", "submit_rate"]
    assert (got["submit_burst"], got["max_waiting"]) == (2, 7)
    again = c.post("/api/v1/images/generations", json=body, headers=auth(key["key"]))
    native_error(again, 429, "rate_limit_exceeded")
    # The caps on open event streams and waits are limits of the key like the others: one
    # stream open, the next is refused; another key's are not touched.
    got = data(c.put(url, json={"max_streams": 1, "max_waits": 3}, headers=ADMIN))
    assert (got["max_streams"], got["max_waits"], got["max_waiting"]) == (1, 3, 7)
    assert got["own"] == [
        "max_streams",
        "max_waiting",
        "max_waits",
        "submit_burst",
        "submit_rate",
    ]
    task_id = first.json()["data"]["task_id"]
    events = f"/api/v1/tasks/{task_id}/events"
    with (
        open_stream(admin_api, key["key"], task_id),
        httpx.Client(base_url=admin_api.base_url, timeout=10) as client,
        client.stream("GET", events, headers=auth(key["key"])) as second,
    ):
        assert second.status_code == 429, "the key's own stream cap let a second stream open"
        second.read()
        assert "its own cap" in native_error(second, 429, "rate_limit_exceeded")["message"]
    # Reset drops them all, and the slow rate's state with them: the defaults' full burst.
    assert data(c.put(url, json={"reset": True}, headers=ADMIN)) == defaults
    fourth = c.post("/api/v1/images/generations", json=body, headers=auth(key["key"]))
    assert fourth.status_code == 200, fourth.text
    assert fourth.headers["ratelimit-policy"].startswith('"submits";q=50;')
    assert fourth.headers["ratelimit"].startswith('"submits";r=49;')
    with open_stream(admin_api, key["key"], task_id), open_stream(admin_api, key["key"], task_id):
        pass  # the default cap again

    assert [(a, k) for _, a, k in audit_rows(admin_api)][1:] == [
        ("keys.limits.get", key["id"]),
        ("keys.limits.set", key["id"]),
        ("keys.limits.get", key["id"]),
        ("keys.limits.set", key["id"]),
        ("keys.limits.set", key["id"]),
        ("keys.limits.reset", key["id"]),
    ]
    log = data(c.get("/admin/v1/audit", params={"key_id": key["id"], "limit": 4}, headers=ADMIN))
    assert [(e["actor"], e["detail"]) for e in log["entries"]][1:] == [
        ("ops", {}),
        ("ops", {"max_streams": 1, "max_waits": 3}),
        ("ops", {"max_waiting": 7}),
    ]


@pytest.mark.parametrize(
    ("body", "param", "sentence"),
    [
        ({"submit_rate": -1}, "submit_rate", "The submit rate must be 0 (no limit) or from"),
        ({"submit_rate": 1e7}, "submit_rate", "The submit rate must be 0 (no limit) or from"),
        ({"submit_rate": 1e-320}, "submit_rate", "The submit rate must be 0 (no limit) or from"),
        ({"submit_burst": 0}, "submit_burst", "The burst must be from 1 to 1000000 submits."),
        ({"submit_burst": 10**30}, "submit_burst", "The burst must be from 1"),
        ({"max_waiting": 2**31}, "max_waiting", "The waiting tasks limit must be from 1"),
        ({"submit_burst": "5"}, "submit_burst", None),
        ({"submit_burst": 2.5}, "submit_burst", None),
        ({"reset": "yes"}, "reset", None),
        ({"burst": 5}, "burst", None),
        ({"reset": True, "submit_rate": 2}, "reset", "Give either new limits or reset, not both."),
        ({"max_streams": 0}, "max_streams", "The max streams must be from 1 to 100000; got 0."),
        ({"max_streams": 100_001}, "max_streams", "The max streams must be from 1 to 100000"),
        ({"max_waits": -1}, "max_waits", "The max waits must be from 1 to 100000; got -1."),
        ({"max_waits": "2"}, "max_waits", None),
        ({"max_streams": 1.5}, "max_streams", None),
        ({"reset": True, "max_waits": 2}, "reset", "Give either new limits or reset, not both."),
        ({"submit_burst": 3, "max_streams": 0}, "max_streams", "The max streams must be"),
        ({}, None, NO_LIMITS),
        ({"submit_rate": None}, None, NO_LIMITS),
    ],
)
def test_bad_limits_are_400_naming_the_field_and_change_nothing(
    admin_api: InProcessApi, body: dict[str, Any], param: str | None, sentence: str | None
) -> None:
    key = create_key(admin_api)
    url = f"/admin/v1/keys/{key['id']}/limits"
    r = admin_api.client.put(url, json=body, headers=ADMIN)
    error = native_error(r, 400, "invalid_request")
    assert error["param"] == param, error
    if sentence is not None:
        assert error["message"].startswith(sentence), error
    assert data(admin_api.client.get(url, headers=ADMIN))["own"] == []
    assert [a for _, a, _ in audit_rows(admin_api)] == ["keys.create", "keys.limits.get"]


# -- usage and the ledger -----------------------------------------------------------------


def ledger_sums(api: InProcessApi, key_id: str | None = None) -> dict[str, int]:
    """The figures a usage report must show, summed straight from the tables."""
    with api.db.read() as conn:

        def scalar(query: Any) -> int:
            return int(conn.execute(query).scalar_one() or 0)

        where = [] if key_id is None else [ledger.c.key_id == key_id]
        task_where = [] if key_id is None else [tasks.c.key_id == key_id]
        charged = -scalar(
            select(func.sum(ledger.c.amount)).where(ledger.c.kind == "reserve", *where)
        )
        refunded = scalar(
            select(func.sum(ledger.c.amount)).where(ledger.c.kind == "refund", *where)
        )
        return {
            "tasks": scalar(select(func.count()).select_from(tasks).where(*task_where)),
            "images": scalar(
                select(func.count())
                .select_from(images.join(tasks, tasks.c.id == images.c.task_id))
                .where(*task_where)
            ),
            "credits_charged": charged,
            "credits_refunded": refunded,
            "credits": charged - refunded,
        }


def test_usage_equals_the_ledger_sums(admin_api: InProcessApi) -> None:
    c = admin_api.client
    alice, bob = create_key(admin_api, "alice", 200), create_key(admin_api, "bob", 200)
    submit(admin_api, alice["key"], n=2)  # hd, 2 images
    submit(admin_api, alice["key"], quality="standard")
    cancelled = submit(admin_api, alice["key"])
    data(c.post(f"/api/v1/tasks/{cancelled}/cancel", headers=auth(alice["key"])))  # refunded
    complete_next_task(admin_api)
    complete_next_task(admin_api)
    with background_worker(admin_api):  # the sync surfaces wait for their task
        r = c.post(
            "/v1/images/generations",
            json={"model": "cogview-4", "prompt": "a red fox", "quality": "standard"},
            headers=auth(bob["key"]),
        )
        assert r.status_code == 200, r.text
        r = c.post(
            "/api/paas/v4/images/generations",
            json={"model": "cogview-4", "prompt": "a red fox"},
            headers=auth(bob["key"]),
        )
        assert r.status_code == 200, r.text

    report = data(c.get("/admin/v1/usage", headers=ADMIN))
    figures = ("tasks", "images", "credits_charged", "credits_refunded", "credits")
    assert report["totals"] == ledger_sums(admin_api)
    assert report["totals"]["credits_refunded"] > 0 and report["totals"]["images"] == 5
    for field in figures:
        assert sum(row[field] for row in report["rows"]) == report["totals"][field]
        assert sum(day[field] for day in report["days"]) == report["totals"][field]
    cells = {(r["key_id"], r["quality"], r["surface"]): r for r in report["rows"]}
    assert set(cells) == {
        (alice["id"], "hd", "native"),
        (alice["id"], "standard", "native"),
        (bob["id"], "standard", "openai"),
        (bob["id"], "standard", "zhipu"),  # Zhipu's default quality
    }
    assert cells[(alice["id"], "hd", "native")]["tasks"] == 2
    assert cells[(alice["id"], "hd", "native")]["images"] == 2
    assert cells[(alice["id"], "hd", "native")]["credits_refunded"] == 4
    assert [d["date"] for d in report["days"]] == [report["to"]]  # all of it today (UTC)

    for key in (alice, bob):
        own = data(c.get("/api/v1/usage", headers=auth(key["key"])))
        assert own["totals"] == ledger_sums(admin_api, key["id"]) and own["key_id"] == key["id"]
        assert {r["key_id"] for r in own["rows"]} == {key["id"]}
        by_admin = data(c.get("/admin/v1/usage", params={"key_id": key["id"]}, headers=ADMIN))
        assert by_admin["rows"] == own["rows"] and by_admin["totals"] == own["totals"]
        balance = data(c.get("/api/v1/account", headers=auth(key["key"])))["balance"]
        assert balance == 200 - own["totals"]["credits"]

    # A range that ends before today holds nothing; one that starts today everything.
    today = report["to"]
    empty = data(c.get("/admin/v1/usage", params={"to": "2020-01-01"}, headers=ADMIN))
    assert empty["rows"] == [] and empty["totals"]["credits"] == 0
    assert empty["from"] == "2019-12-03"  # 30 days, `to` included
    since = data(c.get("/admin/v1/usage", params={"from": today}, headers=ADMIN))
    assert since["totals"] == report["totals"] and since["from"] == since["to"] == today


def test_own_ledger_pages_through_the_keys_entries_only(admin_api: InProcessApi) -> None:
    alice, bob = create_key(admin_api, "alice", 50), create_key(admin_api, "bob", 50)
    for _ in range(3):
        submit(admin_api, alice["key"])
    submit(admin_api, bob["key"])
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = data(
            admin_api.client.get("/api/v1/ledger", params=params, headers=auth(alice["key"]))
        )
        seen += page["entries"]
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            break
    assert [e["kind"] for e in seen] == ["reserve", "reserve", "reserve", "grant"]
    assert {e["key_id"] for e in seen} == {alice["id"]}
    assert [e["id"] for e in seen] == sorted((e["id"] for e in seen), reverse=True)
    assert seen[0]["amount"] == -4 and seen[0]["quality"] == "hd" and seen[0]["surface"] == "native"
    assert sum(e["amount"] for e in seen) == 50 - 12
    native_error(admin_api.client.get("/api/v1/ledger"), 401, "authentication_error")
    native_error(admin_api.client.get("/api/v1/usage"), 401, "authentication_error")


def test_ledger_export_streams_csv_and_jsonl_that_parse(
    admin_api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(usage_service, "EXPORT_BATCH", 3)  # several batches
    alice, bob = create_key(admin_api, "alice", 40), create_key(admin_api, "bob", 40)
    for key in (alice, bob, alice):
        submit(admin_api, key["key"])
    c = admin_api.client
    data(
        c.post(
            f"/admin/v1/keys/{bob['id']}/credits/grant",
            json={"amount": 7, "note": 'a, "b"\nc'},
            headers=ADMIN,
        )
    )
    with admin_api.db.read() as conn:
        expected = [
            (r.id, r.key_id, r.kind, r.amount, r.task_id, r.note)
            for r in conn.execute(select(ledger).order_by(ledger.c.id))
        ]
    assert len(expected) == 6

    with c.stream("GET", "/admin/v1/ledger/export", params={"format": "csv"}, headers=ADMIN) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/csv")
        assert r.headers.get("transfer-encoding") == "chunked"  # streamed, no Content-Length
        assert "attachment" in r.headers["content-disposition"]
        text = r.read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert list(rows[0]) == list(usage_service.EXPORT_COLUMNS)
    assert [
        (
            int(x["id"]),
            x["key_id"],
            x["kind"],
            int(x["amount"]),
            x["task_id"] or None,
            x["note"] or None,
        )
        for x in rows
    ] == expected

    r = c.get("/admin/v1/ledger/export", params={"format": "jsonl"}, headers=ADMIN)
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    records = [json.loads(line) for line in r.text.splitlines()]
    assert [
        (x["id"], x["key_id"], x["kind"], x["amount"], x["task_id"], x["note"]) for x in records
    ] == expected
    assert all(x["created_at"].endswith("Z") for x in records)

    only_bob = c.get(
        "/admin/v1/ledger/export",
        params={"format": "jsonl", "key_id": bob["id"], "from": "2020-01-01"},
        headers=ADMIN,
    )
    assert [json.loads(x)["amount"] for x in only_bob.text.splitlines()] == [40, -4, 7]
    old = c.get("/admin/v1/ledger/export", params={"to": "2020-01-01"}, headers=ADMIN)
    assert old.text == ",".join(usage_service.EXPORT_COLUMNS) + "\r\n"  # the header alone
    assert [a for _, a, _ in audit_rows(admin_api)][-3:] == ["ledger.export"] * 3


def test_usage_days_are_utc_days(admin_api: InProcessApi) -> None:
    """A charge at 23:59:59 UTC counts on that day, one at 00:00:00 on the next, whatever the
    database session's time zone (PostgreSQL's is set to Tokyo's here)."""
    if admin_api.db.engine.dialect.name == "postgresql":
        with admin_api.db.write() as conn:
            conn.execute(
                text(
                    "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET timezone TO %L', "
                    "current_database(), 'Asia/Tokyo'); END $$"
                )
            )
        admin_api.db.engine.dispose()  # new connections take the database's setting
        with admin_api.db.read() as conn:
            assert conn.execute(text("SHOW timezone")).scalar_one() == "Asia/Tokyo"
    key = create_key(admin_api, credits=100)
    late, early = submit(admin_api, key["key"]), submit(admin_api, key["key"], n=2)
    moves = {late: "2026-11-01T23:59:59+00:00", early: "2026-11-02T00:00:00+00:00"}
    with admin_api.db.write() as conn:
        for task_id, at in moves.items():
            conn.execute(
                ledger.update()
                .where(ledger.c.task_id == task_id)
                .values(created_at=datetime.fromisoformat(at))
            )
    params = {"from": "2026-10-31", "to": "2026-11-03", "key_id": key["id"]}
    report = data(admin_api.client.get("/admin/v1/usage", params=params, headers=ADMIN))
    assert [(d["date"], d["tasks"], d["credits"]) for d in report["days"]] == [
        ("2026-11-01", 1, 4),
        ("2026-11-02", 1, 8),
    ]
    own = data(
        admin_api.client.get(
            "/api/v1/usage",
            params={"from": "2026-11-02", "to": "2026-11-02"},
            headers=auth(key["key"]),
        )
    )
    assert own["totals"]["credits"] == 8 and own["from"] == own["to"] == "2026-11-02"
