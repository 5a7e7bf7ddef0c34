"""Logs a person (and a log shipper) can follow: `COGVIEW_LOG_FORMAT=json` from a real `serve`
and a real `worker`, one request id from the API's line to the worker's lines of its task."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx

from cogview_api.engine.echo import ECHO_MODEL, FAIL_MARKER
from tests.support import CLI, EXAMPLE_BODY, ServerProcess, auth, poll_until_done, server_env

SECRET_PROMPT = "a lighthouse in a storm, painted by nobody in particular"


def _json_lines(path: Path) -> list[dict[str, Any]]:
    """Every line of a log file, each of which must be one JSON object."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    assert lines, f"{path.name} is empty"
    return [json.loads(line) for line in lines]


def test_a_failed_request_is_found_by_its_request_id_in_api_and_worker_logs(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(
        tiny_cache,
        {
            "COGVIEW_LOG_FORMAT": "json",
            "COGVIEW_LOG_LEVEL": "info",
            "COGVIEW_ACCESS_LOG": "true",
        },
    )
    api = ServerProcess(workdir=tmp_path, env=env, args=("--workers", "0"))
    key = api.make_key(credits=100)["key"]
    api.start(wait_ready=False)
    worker_log = tmp_path / "worker.log"
    with open(worker_log, "ab") as out:
        worker = subprocess.Popen(
            [*CLI, "worker", "--model", ECHO_MODEL],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        rid = "client-req-7f3a.42"
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            r = client.post(
                "/api/v1/images/generations",
                json={**EXAMPLE_BODY, "prompt": f"{SECRET_PROMPT} {FAIL_MARKER}"},
                headers={**auth(key), "X-Request-ID": rid},
            )
            assert r.status_code == 200, r.text
            assert r.headers["x-request-id"] == rid
            task_id = r.json()["data"]["task_id"]
            assert poll_until_done(client, task_id, key)["status"] == "FAILED"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=30)
        api.stop()

    api_lines = _json_lines(tmp_path / f"serve-{api.port}.log")
    worker_lines = _json_lines(worker_log)
    # The API's line of the request (its access line) carries the id the client sent.
    (submit,) = [
        line
        for line in api_lines
        if line.get("request_id") == rid and line["logger"] == "cogview_api.access"
    ]
    assert submit["path"] == "/api/v1/images/generations" and submit["status"] == 200
    # The worker, another process, read the id with the task: its lines of the task carry both.
    about_task = [line for line in worker_lines if line.get("task_id") == task_id]
    assert about_task and all(line["request_id"] == rid for line in about_task)
    assert any(
        line["level"] == "WARNING" and "engine failed" in line["message"] for line in about_task
    )
    (done,) = [line for line in about_task if line.get("outcome")]
    assert done["level"] == "INFO" and done["outcome"] == "failed"
    assert done["size"] == "1024x1024" and done["quality"] == "hd" and done["images"] == 0
    assert done["queue_wait_s"] >= 0 and done["run_s"] >= 0
    # Each process said once what runs where; no prompt and no key on any line.
    assert sum("database sqlite:///" in line["message"] for line in api_lines) == 1
    assert sum("database sqlite:///" in line["message"] for line in worker_lines) == 1
    text = (tmp_path / f"serve-{api.port}.log").read_text() + worker_log.read_text()
    assert SECRET_PROMPT not in text and key not in text


def test_text_logs_carry_the_ids_and_the_start_says_where_things_are(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(
        tiny_cache,
        {"COGVIEW_LOG_LEVEL": "info", "COGVIEW_ACCESS_LOG": "true", "COGVIEW_MODEL": ECHO_MODEL},
    )
    server = ServerProcess(workdir=tmp_path, env=env, args=())
    key = server.make_key(credits=100)["key"]
    server.start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=30) as client:
            r = client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
            rid, task_id = r.headers["x-request-id"], r.json()["data"]["task_id"]
            assert poll_until_done(client, task_id, key)["status"] == "COMPLETED"
    finally:
        server.stop()
    log = (tmp_path / f"serve-{server.port}.log").read_text()
    base = server.base_url
    assert f"try-it page {base}/ ; API docs {base}/docs ; metrics {base}/metrics" in log
    assert f"database sqlite:///{tmp_path}/cogview-data/cogview.db" in log
    assert f"[request_id={rid}]: POST /api/v1/images/generations 200" in log
    (done,) = [line for line in log.splitlines() if f"task {task_id} completed" in line]
    assert f"[request_id={rid} task_id={task_id}]" in done and "1 image(s)" in done
