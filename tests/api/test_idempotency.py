"""`Idempotency-Key` on the native submit: a retry within 24 h gets the same task and is
charged once, also when the retries race; another body with the same key is 409; keys are
per API key and expire after 24 h. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
import threading
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from cogview_api.clock import utcnow
from cogview_api.services import keys as key_service
from cogview_api.store import idempotency as idempotency_store
from cogview_api.store.db import Database
from cogview_api.store.tables import idempotency_keys, tasks
from tests.support import EXAMPLE_BODY, InProcessApi, auth, background_worker

SUBMIT = "/api/v1/images/generations"
PRICE = 4  # one hd image


def post(
    api: InProcessApi, key: str, idem: str | bytes | None, body: dict[str, Any] | None = None
) -> httpx.Response:
    headers: dict[str, Any] = auth(key)
    if idem is not None:
        headers["Idempotency-Key"] = idem
    return api.client.post(SUBMIT, json=body or EXAMPLE_BODY, headers=headers)


def balance(api: InProcessApi, key: str) -> int:
    return int(api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"])


def task_count(api: InProcessApi) -> int:
    with api.db.read() as conn:
        return int(conn.execute(select(func.count()).select_from(tasks)).scalar_one())


def test_a_retry_gets_the_same_task_and_is_charged_once(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    first = post(api, key, "order-42")
    again = post(api, key, "order-42")
    assert first.status_code == again.status_code == 200, again.text
    assert "idempotent-replayed" not in first.headers
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["data"]["task_id"] == first.json()["data"]["task_id"]
    assert again.json()["data"]["credits_charged"] == PRICE
    assert balance(api, key) == 100 - PRICE
    assert task_count(api) == 1
    # The same body written differently (key order, whitespace) is the same request.
    r = api.client.post(
        SUBMIT,
        content=json.dumps(dict(reversed(EXAMPLE_BODY.items())), indent=2),
        headers={**auth(key), "Idempotency-Key": "order-42", "Content-Type": "application/json"},
    )
    assert r.status_code == 200 and r.headers["idempotent-replayed"] == "true", r.text
    # Without a key, every request is a new task.
    assert post(api, key, None).json()["data"]["task_id"] != first.json()["data"]["task_id"]
    assert balance(api, key) == 100 - 2 * PRICE


def test_the_same_key_with_another_body_is_a_conflict_and_writes_nothing(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    first = post(api, key, "k1")
    r = post(api, key, "k1", {**EXAMPLE_BODY, "prompt": "a different picture"})
    assert r.status_code == 409, r.text
    err = r.json()["error"]
    assert (err["code"], err["type"], err["param"]) == (409, "conflict", "Idempotency-Key")
    assert "different request" in err["message"]
    # A default spelled out is still another body: the key stands for the body as sent.
    assert post(api, key, "k1", {**EXAMPLE_BODY, "n": 1}).status_code == 409
    assert balance(api, key) == 100 - PRICE
    assert task_count(api) == 1
    assert post(api, key, "k1").json()["data"]["task_id"] == first.json()["data"]["task_id"]


def test_racing_retries_make_one_task_and_one_charge(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    start = threading.Barrier(8)
    answers: list[httpx.Response] = []

    def retry() -> None:
        with httpx.Client(base_url=api.base_url, timeout=60) as client:
            start.wait()
            answers.append(
                client.post(
                    SUBMIT, json=EXAMPLE_BODY, headers={**auth(key), "Idempotency-Key": "race"}
                )
            )

    threads = [threading.Thread(target=retry) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
    assert len({r.json()["data"]["task_id"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == 7
    assert balance(api, key) == 100 - PRICE
    assert task_count(api) == 1


def test_a_claim_that_loses_the_race_is_told_so(db: Database) -> None:
    """PostgreSQL: the second INSERT of a key waits for the first transaction, then fails with a
    unique violation, which the store raises as KeyClaimedMeanwhile (SQLite never gets there:
    its writers are serialized, so the second one finds the row)."""
    if db.dialect != "postgresql":
        pytest.skip("SQLite serializes writers; the race cannot happen there")
    key, _ = key_service.create_key(db, name="race", credits=0)
    claim = {"key_id": key.id, "idem_key": "k", "request_hash": "h"}
    outcome: list[BaseException | None] = []
    with db.engine.connect() as first:
        first.begin()
        idempotency_store.claim(first, **claim)

        def second() -> None:
            try:
                with db.engine.connect() as conn, conn.begin():
                    idempotency_store.claim(conn, **claim)
                outcome.append(None)
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                outcome.append(exc)

        waiter = threading.Thread(target=second)
        waiter.start()
        waiter.join(timeout=1)
        assert waiter.is_alive(), "the second claim should wait for the first transaction"
        first.commit()
        waiter.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], idempotency_store.KeyClaimedMeanwhile)


def test_keys_are_per_api_key(api: InProcessApi) -> None:
    alice, bob = api.make_key(credits=100, name="alice"), api.make_key(credits=100, name="bob")
    a = post(api, alice, "shared-key")
    b = post(api, bob, "shared-key", {**EXAMPLE_BODY, "prompt": "bob's own picture"})
    assert a.status_code == b.status_code == 200, b.text
    assert "idempotent-replayed" not in b.headers
    assert a.json()["data"]["task_id"] != b.json()["data"]["task_id"]
    assert balance(api, alice) == balance(api, bob) == 100 - PRICE


def test_a_key_expires_after_24_hours(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    first = post(api, key, "daily").json()["data"]["task_id"]
    other = api.make_key(credits=100, name="other")
    post(api, other, "stale")
    with api.db.write() as conn:  # the clock, moved on: both records are now 24 h + 1 s old
        old = utcnow() - timedelta(hours=24, seconds=1)
        conn.execute(update(idempotency_keys).values(created_at=old))
    r = post(api, key, "daily", {**EXAMPLE_BODY, "prompt": "a new day"})
    assert r.status_code == 200, r.text
    assert "idempotent-replayed" not in r.headers
    second = r.json()["data"]["task_id"]
    assert second != first
    assert balance(api, key) == 100 - 2 * PRICE
    with api.db.read() as conn:
        query = select(idempotency_keys.c.idem_key, idempotency_keys.c.task_id)
        rows = dict(conn.execute(query).tuples().all())
    # The new record replaced the old one; the other API key's expired one stays until that
    # key's next keyed submit purges it.
    assert rows.keys() == {"daily", "stale"} and rows["daily"] == second
    post(api, other, "fresh")
    with api.db.read() as conn:
        left = {r.idem_key for r in conn.execute(select(idempotency_keys.c.idem_key)).all()}
    assert left == {"daily", "fresh"}


def test_a_refused_submit_leaves_the_key_unused(api: InProcessApi) -> None:
    key = api.make_key(credits=0)
    assert post(api, key, "broke").status_code == 402
    key_id = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["key_id"]
    key_service.grant_credits(api.db, key_id=key_id, amount=10)
    r = post(api, key, "broke")
    assert r.status_code == 200 and "idempotent-replayed" not in r.headers, r.text
    assert balance(api, key) == 10 - PRICE


@pytest.mark.parametrize(
    "value",
    ["", "x" * 256, "caf\xe9".encode("latin-1"), "tab\there"],
    ids=["empty", "too-long", "not-ascii", "control-char"],
)
def test_a_malformed_key_is_refused(api: InProcessApi, value: str | bytes) -> None:
    key = api.make_key(credits=100)
    r = post(api, key, value)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["type"], err["param"]) == ("invalid_request", "Idempotency-Key")
    assert balance(api, key) == 100 and task_count(api) == 0
    assert post(api, key, "x" * 255).status_code == 200  # the longest key allowed


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/images/generations", {"model": "cogview-4", "prompt": "a red fox in snow"}),
        ("/api/paas/v4/images/generations", {"model": "cogview-4", "prompt": "a red fox"}),
    ],
    ids=["openai", "zhipu"],
)
def test_the_compatible_routes_honour_it_too(
    api: InProcessApi, path: str, body: dict[str, Any]
) -> None:
    key = api.make_key(credits=100)
    headers = {**auth(key), "Idempotency-Key": "sdk-retry-1"}
    with background_worker(api):
        first = api.client.post(path, json=body, headers=headers)
        again = api.client.post(path, json=body, headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert again.json() == first.json()  # same task: same `created`, same image URLs
    assert task_count(api) == 1 and balance(api, key) == 100 - 4
    conflict = api.client.post(path, json={**body, "prompt": "a cat"}, headers=headers)
    assert conflict.status_code == 409, conflict.text
    assert "Idempotency-Key" in conflict.json()["error"]["message"]
    assert task_count(api) == 1 and balance(api, key) == 100 - 4


def test_a_key_used_on_one_surface_is_another_request_on_the_next(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    assert post(api, key, "one-key").status_code == 200
    r = api.client.post(
        "/v1/images/generations",
        json={"model": "cogview-4", "prompt": EXAMPLE_BODY["prompt"]},
        headers={**auth(key), "Idempotency-Key": "one-key"},
    )
    assert r.status_code == 409, r.text
    assert r.json()["error"]["param"] == "Idempotency-Key"  # OpenAI's envelope
    assert task_count(api) == 1 and balance(api, key) == 100 - PRICE
