"""Server-Sent Events of a task through the HTTP API (no engine: tasks change by cancels and a
stand-in worker)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from cogview_api.config import Settings
from cogview_api.services.watch import TaskWatcher
from tests.support import (
    InProcessApi,
    auth,
    complete_next_task,
    in_process_api,
    sse_items,
    submit_task,
)


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    """The API with a keep-alive short enough to see in a test."""
    with in_process_api(settings.model_copy(update={"sse_keepalive_seconds": 0.3})) as running:
        yield running


def get(api: InProcessApi, key: str, task_id: str) -> dict[str, Any]:
    data: dict[str, Any] = api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()[
        "data"
    ]
    return data


def next_task(items: Iterator[tuple[str, Any]]) -> dict[str, Any]:
    """The next `task` frame, skipping keep-alive comments."""
    for kind, value in items:
        if kind == "task":
            data: dict[str, Any] = value
            return data
        assert (kind, value) == ("comment", "keep-alive")
    raise AssertionError("the stream ended")


def test_stream_starts_with_the_task_and_ends_after_its_terminal_state(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    ahead, task_id = submit_task(api.client, key), submit_task(api.client, key)
    with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        assert r.headers["x-accel-buffering"] == "no"
        items = sse_items(r)
        first = next(items)
        assert first == ("task", get(api, key, task_id))
        assert first[1]["progress"]["queue_position"] == 2
        assert next(items) == ("comment", "keep-alive")  # nothing changed meanwhile
        api.client.post(f"/api/v1/tasks/{ahead}/cancel", headers=auth(key))
        moved_up = next_task(items)
        assert moved_up["status"] == "IN_PROGRESS"
        assert moved_up["progress"]["queue_position"] == 1
        api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
        last = next_task(items)
        assert last["status"] == "CANCELLED"
        assert last["credits"] == {"charged": 4, "refunded": 4}
        assert last == get(api, key, task_id)
        assert list(items) == []  # the server closed the stream


def test_stream_of_a_finished_task_is_that_one_event(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    task_id = submit_task(api.client, key)
    complete_next_task(api)
    with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        items = list(sse_items(r))
    assert items == [("task", get(api, key, task_id))]
    assert items[0][1]["status"] == "COMPLETED" and len(items[0][1]["images"]) == 1


def test_stream_of_another_keys_task_is_a_plain_404(api: InProcessApi) -> None:
    owner, other = api.make_key(name="owner"), api.make_key(name="other")
    task_id = submit_task(api.client, owner)
    for key, target in ((other, task_id), (owner, "nope_cv4")):
        r = api.client.get(f"/api/v1/tasks/{target}/events", headers=auth(key))
        assert r.status_code == 404
        assert r.headers["content-type"] == "application/json"
        assert r.json()["error"]["type"] == "not_found"
    assert api.client.get(f"/api/v1/tasks/{task_id}/events").status_code == 401


def test_a_client_that_goes_away_ends_its_stream(api: InProcessApi) -> None:
    key = api.make_key()
    task_id = submit_task(api.client, key)
    signals: TaskWatcher = api.app.state.watcher
    with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        items = sse_items(r)  # kept: dropping it would close the connection here already
        assert next(items)[0] == "task"
        assert signals.subscribers(task_id) == 1
    deadline = time.monotonic() + 5
    while signals.subscribers(task_id) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert signals.subscribers(task_id) == 0
