"""Cancel and Server-Sent Events against `cogview-api serve --model tiny` in a subprocess, with
`hd` slow enough (40 steps, about 0.35 s each at 1024*1024 here) to act while it denoises."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import (
    ServerProcess,
    auth,
    poll_until_done,
    server_env,
    sse_items,
    submit_task,
)

HD_STEPS = 40
QUICK = {"quality": "standard", "size": "512*512"}  # one step: done in well under a second
STAGES = ["queued", "encoding", "denoising", "decoding", "saving", "done"]


@pytest.fixture(scope="module")
def slow_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path
) -> Iterator[ServerProcess]:
    workdir = tmp_path_factory.mktemp("serve-slow")
    env = server_env(tiny_cache, {"COGVIEW_STEPS_HD": str(HD_STEPS)})
    with ServerProcess(workdir=workdir, env=env).start() as proc:
        yield proc


@pytest.fixture(scope="module")
def client(slow_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=slow_server.base_url, timeout=60) as c:
        yield c


def get(client: httpx.Client, key: str, task_id: str) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()["data"]
    return data


def balance(client: httpx.Client, key: str) -> int:
    return int(client.get("/api/v1/account", headers=auth(key)).json()["data"]["balance"])


def wait_for_step(client: httpx.Client, key: str, task_id: str, step: int) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        task = get(client, key, task_id)
        if task["progress"]["stage"] == "denoising" and task["progress"]["step"] >= step:
            return task
        time.sleep(0.05)
    raise TimeoutError(f"task {task_id} never reached step {step}")


def at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def image_files(server: ServerProcess, task_id: str) -> list[Path]:
    return [p for p in (server.workdir / "cogview-data" / "images").rglob(f"*/{task_id}/*")]


def test_cancel_while_running_stops_the_worker_at_its_next_step(
    slow_server: ServerProcess, client: httpx.Client
) -> None:
    key = str(slow_server.make_key(credits=40)["key"])
    long_id = submit_task(client, key)
    next_id = submit_task(client, key, **QUICK)
    running = wait_for_step(client, key, long_id, 2)
    r = client.post(f"/api/v1/tasks/{long_id}/cancel", headers=auth(key))
    assert r.status_code == 200, r.text
    cancelled = r.json()["data"]
    assert cancelled["status"] == "CANCELLED" and cancelled["error"]["type"] == "cancelled"
    assert cancelled["credits"] == {"charged": 4, "refunded": 4} and cancelled["images"] == []
    assert balance(client, key) == 36

    quick = poll_until_done(client, next_id, key)
    assert quick["status"] == "COMPLETED"
    # Had the worker finished the cancelled task, the next one would have waited for the
    # remaining steps and a decode; it starts within a few steps of the cancel instead.
    step_s = (at(cancelled["completed_at"]) - at(running["started_at"])).total_seconds() / (
        cancelled["progress"]["step"]
    )
    waited = (at(quick["started_at"]) - at(cancelled["completed_at"])).total_seconds()
    assert HD_STEPS - cancelled["progress"]["step"] > 30
    assert waited < 10 * step_s
    assert get(client, key, long_id) == cancelled  # nothing written to it afterwards
    assert image_files(slow_server, long_id) == []
    assert balance(client, key) == 36  # the quick one paid, the cancelled one refunded


def test_cancel_racing_completion_gives_one_consistent_outcome(
    slow_server: ServerProcess, client: httpx.Client
) -> None:
    key = str(slow_server.make_key(credits=100)["key"])
    outcomes: dict[str, str] = {}
    # Spread over a quick task's life (about 0.6 s here): cancels land while it waits,
    # encodes, decodes or saves, or after it finished.
    for delay in (0.0, 0.1, 0.2, 0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.8):
        task_id = submit_task(client, key, **QUICK)
        time.sleep(delay)
        r = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
        assert r.status_code in (200, 409), r.text
        task = poll_until_done(client, task_id, key)
        if r.status_code == 200:
            assert r.json()["data"]["status"] == "CANCELLED"
            assert task["status"] == "CANCELLED" and task["images"] == []
            assert task["credits"] == {"charged": 4, "refunded": 4}
        else:
            assert r.json()["error"]["type"] == "conflict"
            assert task["status"] == "COMPLETED" and len(task["images"]) == 1
            assert task["credits"] == {"charged": 4, "refunded": 0}
            assert httpx.get(task["images"][0]["url"]).status_code == 200
        assert get(client, key, task_id) == task  # settled for good
        outcomes[task_id] = task["status"]
    # One more task through the single worker: it is done with all of the above by then.
    assert poll_until_done(client, submit_task(client, key, **QUICK), key)["status"] == "COMPLETED"
    completed = [t for t, status in outcomes.items() if status == "COMPLETED"]
    assert balance(client, key) == 100 - 4 * (len(completed) + 1), outcomes
    for task_id, status in outcomes.items():
        expected = 1 if status == "COMPLETED" else 0
        assert len(image_files(slow_server, task_id)) == expected, outcomes


def read_stream(client: httpx.Client, key: str, task_id: str) -> Iterator[dict[str, Any]]:
    with client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for kind, data in sse_items(r):
            if kind == "task":
                yield data


def test_event_stream_follows_a_task_from_first_event_to_last(
    slow_server: ServerProcess, client: httpx.Client
) -> None:
    key = str(slow_server.make_key(credits=40)["key"])
    task_id = submit_task(client, key, size="512*512")
    seen = list(read_stream(client, key, task_id))  # returns only once the server closes it
    assert seen[0]["status"] == "IN_PROGRESS" and seen[-1]["status"] == "COMPLETED"
    assert all(e["status"] == "IN_PROGRESS" for e in seen[:-1])
    assert all(e["task_id"] == task_id for e in seen)
    steps = [e["progress"]["step"] for e in seen]
    stages = [STAGES.index(e["progress"]["stage"]) for e in seen]
    assert steps == sorted(steps) and stages == sorted(stages)
    # Progress between the ends was streamed (the row is read every 0.25 s: about 6 frames
    # for this task here, fewer on faster hardware).
    assert any(0 < e["progress"]["step"] < HD_STEPS for e in seen[1:-1])
    assert seen[-1] == get(client, key, task_id)
    assert len(seen[-1]["images"]) == 1


def test_event_stream_of_a_cancelled_task_ends_with_cancelled(
    slow_server: ServerProcess, client: httpx.Client
) -> None:
    key = str(slow_server.make_key(credits=40)["key"])
    task_id = submit_task(client, key)
    seen: list[dict[str, Any]] = []
    for event in read_stream(client, key, task_id):
        seen.append(event)
        if event["progress"]["stage"] == "denoising" and event["status"] == "IN_PROGRESS":
            r = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
            assert r.status_code == 200, r.text
    assert seen[-1]["status"] == "CANCELLED"
    assert seen[-1]["credits"] == {"charged": 4, "refunded": 4}
    assert seen[-1] == get(client, key, task_id)
    assert all(e["status"] == "IN_PROGRESS" for e in seen[:-1])


def test_shutdown_ends_open_event_streams(tmp_path: Path, tiny_cache: Path) -> None:
    """uvicorn waits for open responses when it stops; a stream on a task that waits for a
    worker must not hold the server up."""
    proc = ServerProcess(workdir=tmp_path, env=server_env(tiny_cache), args=("--workers", "0"))
    proc.start(wait_ready=False)
    try:
        key = str(proc.make_key(credits=40)["key"])
        with httpx.Client(base_url=proc.base_url, timeout=30) as c:
            task_id = submit_task(c, key)
            with c.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
                items = sse_items(r)
                assert next(items)[0] == "task"
                assert proc.proc is not None
                proc.proc.send_signal(signal.SIGINT)
                assert proc.proc.wait(timeout=15) == 0
                assert list(items) == []  # ended by the server, no terminal frame
    finally:
        proc.stop()
