"""Submitting, listing and paying for tasks through the HTTP API (no worker running)."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
from sqlalchemy import func, select

from cogview_api.config import Settings
from cogview_api.store import keys as key_store
from cogview_api.store import tasks as task_store
from cogview_api.store.tables import tasks
from tests.support import EXAMPLE_BODY, InProcessApi, auth, in_process_api, submit_task


def submit(api: InProcessApi, key: str, **changes: object) -> httpx.Response:
    return api.client.post(
        "/api/v1/images/generations", json={**EXAMPLE_BODY, **changes}, headers=auth(key)
    )


def balance(api: InProcessApi, key: str) -> int:
    data = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    return int(data["balance"])


def test_creation_answer_matches_the_hosted_shape(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    r = submit(api, key)
    assert r.status_code == 200
    payload = r.json()
    assert payload["code"] == 200 and payload["message"] == "success"
    data = payload["data"]
    assert data["status"] == "IN_PROGRESS"
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}_cv4", data["task_id"])
    assert data["credits_charged"] == 4


def test_task_object_has_every_documented_field(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    task_id = submit(
        api,
        key,
        size="768x1344",
        seed=42,
        n=2,
        user_id="u-1",
        negative_prompt="blurry",
        output_format="webp",
        quality="standard",
    ).json()["data"]["task_id"]
    data = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
    assert data["task_id"] == task_id and data["model"] == "cogview-4"
    assert data["status"] == "IN_PROGRESS"
    assert data["created_at"].endswith("Z") or data["created_at"].endswith("+00:00")
    assert data["started_at"] is None and data["completed_at"] is None
    assert data["request"] == {
        "prompt": EXAMPLE_BODY["prompt"],
        "negative_prompt": "blurry",
        "size": "768*1344",
        "quality": "standard",
        "n": 2,
        "seed": 42,
        "output_format": "webp",
        "user_id": "u-1",
    }
    assert data["progress"] == {
        "stage": "queued",
        "percent": 0,
        "step": 0,
        "total_steps": api.settings.steps_standard,
        "queue_position": 1,
    }
    assert data["images"] == [] and data["error"] is None
    assert data["credits"] == {"charged": 8, "refunded": 0}


def test_queue_position_counts_tasks_ahead(api: InProcessApi) -> None:
    a, b = api.make_key(credits=40, name="a"), api.make_key(credits=40, name="b")
    ids = [submit(api, k).json()["data"]["task_id"] for k in (a, b, a)]
    positions = [
        api.client.get(f"/api/v1/tasks/{t}", headers=auth(k)).json()["data"]["progress"][
            "queue_position"
        ]
        for t, k in zip(ids, (a, b, a), strict=True)
    ]
    assert positions == [1, 2, 3]


def test_credits_are_reserved_per_image_at_submit(api: InProcessApi) -> None:
    key = api.make_key(credits=20)
    submit(api, key)
    assert balance(api, key) == 16
    submit(api, key, n=3, quality="standard")
    assert balance(api, key) == 4
    acct = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert acct["credits_spent"] == 16 and acct["images_generated"] == 0
    assert acct["name"] == "test"
    assert submit(api, key, n=2).status_code == 402
    assert balance(api, key) == 4


def test_balance_never_goes_below_zero_under_50_concurrent_submits(api: InProcessApi) -> None:
    key = api.make_key(credits=40)  # enough for exactly 10 images

    def one(_: int) -> int:
        with httpx.Client(base_url=api.base_url, timeout=60) as c:
            return c.post(
                "/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key)
            ).status_code

    with ThreadPoolExecutor(max_workers=50) as pool:
        codes = list(pool.map(one, range(50)))
    assert codes.count(200) == 10
    assert codes.count(402) == 40
    assert balance(api, key) == 0
    tasks = api.client.get("/api/v1/tasks?limit=100", headers=auth(key)).json()["data"]["tasks"]
    assert len(tasks) == 10
    # Every credit traces to a ledger row.
    with api.db.read() as conn:
        (record,) = key_store.list_keys(conn)
        assert key_store.ledger_sum(conn, record.id) == 0


def test_listing_pages_newest_first_with_a_cursor(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    ids = [submit(api, key, user_id=f"u{i}").json()["data"]["task_id"] for i in range(5)]
    seen: list[str] = []
    cursor = None
    while True:
        q = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        data = api.client.get(f"/api/v1/tasks?{q}", headers=auth(key)).json()["data"]
        seen += [t["task_id"] for t in data["tasks"]]
        assert data["has_more"] == (data["next_cursor"] is not None)
        cursor = data["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))
    only = api.client.get("/api/v1/tasks?status=COMPLETED", headers=auth(key)).json()["data"]
    assert only["tasks"] == []
    live = api.client.get("/api/v1/tasks?status=in_progress", headers=auth(key)).json()["data"]
    assert len(live["tasks"]) == 5


def test_health_and_readiness(api: InProcessApi) -> None:
    assert api.client.get("/healthz").json() == {"status": "ok"}
    r = api.client.get("/readyz")  # no worker in this process
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
    assert "retry-after" in r.headers


def test_full_queue_is_503_and_charges_nothing(settings: Settings) -> None:
    with in_process_api(settings.model_copy(update={"max_queue": 2})) as small:
        key = small.make_key(credits=40)
        assert submit(small, key).status_code == 200
        assert submit(small, key).status_code == 200
        r = submit(small, key)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        assert int(r.headers["retry-after"]) > 0
        assert balance(small, key) == 32


def test_prefer_wait_that_runs_out_answers_with_the_creation_answer(api: InProcessApi) -> None:
    key = api.make_key(credits=40)  # no worker here: the task cannot finish
    r = api.client.post(
        "/api/v1/images/generations",
        json=EXAMPLE_BODY,
        headers={**auth(key), "Prefer": "respond-async, wait=1"},
    )
    assert r.status_code == 200
    assert "preference-applied" not in r.headers
    assert set(r.json()["data"]) == {
        "task_id",
        "status",
        "created_at",
        "credits_charged",
        "queue_position",
    }
    assert r.elapsed.total_seconds() >= 1.0


def test_openapi_document_describes_the_submit_body(api: InProcessApi) -> None:
    doc = api.client.get("/openapi.json").json()
    op = doc["paths"]["/api/v1/images/generations"]["post"]
    schema = op["requestBody"]["content"]["application/json"]["schema"]
    assert schema["additionalProperties"] is False
    assert {"model", "prompt"} <= set(schema["required"])
    assert "size" in schema["properties"] and "examples" in schema
    assert "$ref" not in str(schema)  # self-contained: no reference left dangling


def test_a_timed_out_wait_answers_the_position_of_now(api: InProcessApi) -> None:
    """`Prefer: wait` that times out answers the task as it is then, not as it was accepted: the
    task ahead is cancelled during the wait, so the position is 1, not the 2 of the submit."""
    key = api.make_key(credits=100)
    ahead = submit_task(api.client, key)

    def cancel_ahead_once_behind_waits() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with api.db.read() as conn:
                if conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 2:
                    break
            time.sleep(0.01)
        with api.db.write() as conn:
            assert task_store.cancel_task(conn, task_id=ahead, message="test")

    helper = threading.Thread(target=cancel_ahead_once_behind_waits)
    helper.start()
    r = api.client.post(
        "/api/v1/images/generations",
        headers={**auth(key), "Prefer": "wait=3"},
        json=EXAMPLE_BODY,
    )
    helper.join()
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["status"] == "IN_PROGRESS" and data["queue_position"] == 1
