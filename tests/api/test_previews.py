"""Native partial previews (`"previews": 0..3`) through the HTTP API, with the test-echo engine
in a real worker thread on both database backends: where they appear, how they are served, and
that a task without them looks as it always did."""

from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.engine.echo import EchoEngine
from cogview_api.store.tables import previews
from tests.conftest import make_settings
from tests.support import (
    InProcessApi,
    auth,
    background_worker,
    in_process_api,
    poll_until_done,
    sse_items,
    submit_task,
)

SMALL = {"size": "512*512", "quality": "hd"}  # hd: 4 steps here, so 3 previews fit


@pytest.fixture
def settings(tmp_path: Path, tiny_cache: Path, database_url: str) -> Settings:
    return make_settings(
        tmp_path, tiny_cache, database_url=database_url, model="test-echo", steps_hd=4
    )


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    with in_process_api(settings) as running, background_worker(running, EchoEngine(settings)):
        yield running


def test_a_task_with_previews_lists_them_as_they_are_made_and_serves_them_without_a_key(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    task_id = submit_task(api.client, key, previews=3, **SMALL)
    frames: list[dict[str, Any]] = []
    with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        frames = [value for kind, value in sse_items(r) if kind == "task"]
    assert all("previews" in f for f in frames), "every frame of the task carries the list"
    counts = [len(f["previews"]) for f in frames]
    assert counts == sorted(counts) and counts[-1] == 3

    task = poll_until_done(api.client, task_id, key)
    assert task["status"] == "COMPLETED"
    assert [(p["index"], p["step"]) for p in task["previews"]] == [(0, 1), (1, 2), (2, 3)]
    assert task["credits"]["charged"] == 4, "previews are free"
    for preview in task["previews"]:
        got = api.client.get(preview["url"])  # no bearer
        assert got.status_code == 200
        assert got.headers["content-type"] == "image/webp"
        image = Image.open(io.BytesIO(got.content))
        assert (image.format, image.size) == ("WEBP", (512, 512))
    # Real pictures of the run: the echo engine's preview darkens with how early it was made.
    final = Image.open(io.BytesIO(api.client.get(task["images"][0]["url"]).content))
    assert final.format == "PNG"


def test_a_task_that_asked_for_none_has_no_previews_key(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    task_id = submit_task(api.client, key, **SMALL)
    task = poll_until_done(api.client, task_id, key)
    assert task["status"] == "COMPLETED" and "previews" not in task
    listed = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    assert "previews" not in listed[0]
    with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        assert all("previews" not in v for kind, v in sse_items(r) if kind == "task")


def test_previews_are_evenly_spaced_over_the_steps(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    task = poll_until_done(api.client, submit_task(api.client, key, previews=2, **SMALL), key)
    assert [p["step"] for p in task["previews"]] == [1, 3]  # 4 steps: after 1.33 and 2.67


def test_a_waiting_task_with_previews_shows_an_empty_list(settings: Settings) -> None:
    with in_process_api(settings) as idle:  # no worker: the task waits
        key = idle.make_key(credits=100)
        task_id = submit_task(idle.client, key, previews=1, **SMALL)
        task = idle.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
    assert task["status"] == "IN_PROGRESS" and task["previews"] == []


def test_previews_out_of_range_or_of_another_type_is_a_400(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    for value in (4, -1, "2", True, 1.5, None):
        r = api.client.post(
            "/api/v1/images/generations",
            json={"model": "cogview-4", "prompt": "a fox", "previews": value},
            headers=auth(key),
        )
        assert r.status_code == 400, (value, r.text)
        error = r.json()["error"]
        assert (error["type"], error["param"]) == ("invalid_request", "previews"), value
    assert api.client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"] == 100


def test_a_preview_past_its_retention_is_gone(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    task = poll_until_done(api.client, submit_task(api.client, key, previews=1, **SMALL), key)
    (preview,) = task["previews"]
    assert api.client.get(preview["url"]).status_code == 200
    with api.db.write() as conn:
        conn.execute(update(previews).values(expires_at=utcnow() - timedelta(seconds=1)))
    r = api.client.get(preview["url"])
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
