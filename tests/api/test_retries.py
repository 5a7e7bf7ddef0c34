"""Retries of the synchronous OpenAI and Zhipu routes join the first request's task (docs/api.md,
"Retries"): the edges of the rule, on SQLite and PostgreSQL. No worker runs and the routes wait
only 0.3 s, so every task stays in progress and each answer is a 504 naming its task; what is
under test is which task a request lands on and what it is charged."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.store.tables import sync_requests, tasks
from tests.support import EXAMPLE_BODY, InProcessApi, auth, in_process_api

OPENAI = "/v1/images/generations"
ZHIPU = "/api/paas/v4/images/generations"
OPENAI_BODY = {"model": "cogview-4", "prompt": EXAMPLE_BODY["prompt"], "size": "1024x1024"}
ZHIPU_BODY = {"model": "cogview-4", "prompt": EXAMPLE_BODY["prompt"]}
PRICE = 4
RETRY = {"X-Stainless-Retry-Count": "1"}


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    """The API with a 0.3 s synchronous wait and no worker: every task is still running."""
    with in_process_api(settings.model_copy(update={"sync_wait_seconds": 0.3})) as running:
        yield running


def post(
    api: InProcessApi,
    key: str,
    *,
    path: str = OPENAI,
    body: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    payload = body or (OPENAI_BODY if path == OPENAI else ZHIPU_BODY)
    r = api.client.post(path, json=payload, headers={**auth(key), **(headers or {})})
    assert r.status_code == 504, r.text  # the task goes on (no worker)
    return r


def task_ids(api: InProcessApi, key: str) -> list[str]:
    listed = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    return [str(t["task_id"]) for t in listed]


def balance(api: InProcessApi, key: str) -> int:
    return int(api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"])


def test_a_marked_retry_joins_the_running_task_and_pays_nothing(api: InProcessApi) -> None:
    key = api.make_key()
    first = post(api, key, headers={"X-Stainless-Retry-Count": "0"})
    again = post(api, key, headers={"X-Stainless-Retry-Count": "2"})
    (task_id,) = task_ids(api, key)
    assert task_id in first.json()["error"]["message"]
    assert task_id in again.json()["error"]["message"]
    assert balance(api, key) == 100 - PRICE


@pytest.mark.parametrize(
    "retry",
    [
        {"body": {**OPENAI_BODY, "prompt": "another picture"}},
        {"body": {**OPENAI_BODY, "n": 1}},  # a default spelled out is another body
        {"path": ZHIPU, "body": OPENAI_BODY | {"size": "1024x1024"}},  # another surface
    ],
    ids=["prompt", "default-spelled-out", "surface"],
)
def test_a_marked_retry_of_another_request_is_a_new_task(
    api: InProcessApi, retry: dict[str, Any]
) -> None:
    key = api.make_key()
    post(api, key)
    post(api, key, headers=RETRY, **retry)
    assert len(task_ids(api, key)) == 2
    assert balance(api, key) == 100 - 2 * PRICE


def test_a_marked_retry_from_another_key_is_a_new_task(api: InProcessApi) -> None:
    first, other = api.make_key(), api.make_key()
    post(api, first)
    post(api, other, headers=RETRY)
    assert len(task_ids(api, first)) == len(task_ids(api, other)) == 1
    assert balance(api, first) == balance(api, other) == 100 - PRICE


def test_a_marked_retry_after_the_window_is_a_new_task(api: InProcessApi) -> None:
    key = api.make_key()
    post(api, key)
    window = timedelta(seconds=api.settings.retry_window_seconds)
    with api.db.write() as conn:
        conn.execute(update(sync_requests).values(created_at=utcnow() - window))
    post(api, key, headers=RETRY)
    assert len(task_ids(api, key)) == 2


def test_a_marked_retry_of_a_cancelled_task_is_a_new_task(api: InProcessApi) -> None:
    key = api.make_key()
    post(api, key)
    (task_id,) = task_ids(api, key)
    assert api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key)).status_code == 200
    post(api, key, headers=RETRY)
    assert len(task_ids(api, key)) == 2
    assert balance(api, key) == 100 - PRICE  # the cancelled one was refunded


@pytest.mark.parametrize("path", [OPENAI, ZHIPU], ids=["openai", "zhipu"])
def test_identical_requests_without_a_marker_are_two_tasks(api: InProcessApi, path: str) -> None:
    key = api.make_key()
    post(api, key, path=path)
    post(api, key, path=path)
    assert len(task_ids(api, key)) == 2
    assert balance(api, key) == 100 - 2 * PRICE


def test_a_malformed_marker_is_no_marker(api: InProcessApi) -> None:
    key = api.make_key()
    post(api, key)
    post(api, key, headers={"X-Stainless-Retry-Count": "one"})
    assert len(task_ids(api, key)) == 2


def test_with_the_window_at_zero_retries_are_new_tasks(settings: Settings) -> None:
    off = settings.model_copy(update={"sync_wait_seconds": 0.3, "retry_window_seconds": 0})
    with in_process_api(off) as api:
        key = api.make_key()
        post(api, key)
        post(api, key, headers=RETRY)
        assert len(task_ids(api, key)) == 2


@pytest.mark.parametrize("path", [OPENAI, ZHIPU], ids=["openai", "zhipu"])
def test_an_unmarked_retry_joins_a_task_whose_client_hung_up(api: InProcessApi, path: str) -> None:
    """The Zhipu SDK marks nothing: its retry comes after its timeout closed the connection."""
    key = api.make_key()
    body = OPENAI_BODY if path == OPENAI else ZHIPU_BODY
    long_wait = api.settings.model_copy(update={"sync_wait_seconds": 60.0})
    with in_process_api(long_wait) as patient:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(patient.base_url + path, json=body, headers=auth(key), timeout=0.5)
        wait_for_answer(api, "gone")
    post(api, key, path=path)  # no marker: joins the abandoned task
    (task_id,) = task_ids(api, key)
    assert balance(api, key) == 100 - PRICE
    # Nothing reached a client yet (504): a second identical request still joins it.
    post(api, key, path=path)
    assert task_ids(api, key) == [task_id]


def test_only_the_synchronous_routes_remember_their_submits(api: InProcessApi) -> None:
    key = api.make_key()
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    assert r.status_code == 200, r.text
    post(api, key)
    with api.db.read() as conn:
        assert conn.execute(select(func.count()).select_from(sync_requests)).scalar_one() == 1
        assert conn.execute(select(func.count()).select_from(tasks)).scalar_one() == 2


def wait_for_answer(api: InProcessApi, answer: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with api.db.read() as conn:
            if conn.execute(select(sync_requests.c.answer)).scalar() == answer:
                return
        time.sleep(0.05)
    raise AssertionError(f"no sync request marked {answer!r}")


def test_a_marked_retry_does_not_join_a_request_still_waiting(settings: Settings) -> None:
    """Two workers of one client send one body; the second's first attempt was refused (no
    task), so its retry carries a marker: it is a new task, not the first worker's."""
    with in_process_api(settings.model_copy(update={"sync_wait_seconds": 20})) as api:
        key = api.make_key()
        held: list[httpx.Response] = []

        def hold() -> None:
            with httpx.Client(base_url=api.base_url, timeout=30) as c:
                held.append(c.post(OPENAI, json=OPENAI_BODY, headers=auth(key)))

        holder = threading.Thread(target=hold)
        holder.start()
        deadline = time.monotonic() + 10
        while not task_ids(api, key):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=api.base_url, timeout=30) as c:
            retry = threading.Thread(
                target=lambda: c.post(OPENAI, json=OPENAI_BODY, headers={**auth(key), **RETRY})
            )
            retry.start()
            while len(task_ids(api, key)) < 2:
                assert time.monotonic() < deadline, "the marked retry joined the waiting one"
                time.sleep(0.05)
            for task_id in task_ids(api, key):
                api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
            retry.join(timeout=20)
        holder.join(timeout=20)
