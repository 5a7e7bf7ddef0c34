"""The batches API (docs/api.md "Batches"), on SQLite and PostgreSQL: one submit of many
requests, validated whole and paid for in one transaction, run as ordinary tasks, read, paged,
cancelled with refunds, followed and downloaded as a ZIP."""

from __future__ import annotations

import io
import json
import threading
import time
import tracemalloc
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cogview_api import signing
from cogview_api.api.present import webhook_payload
from cogview_api.api.present_batches import batch_webhook_payload
from cogview_api.engine.echo import NOISE_MARKER, EchoEngine
from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from cogview_api.webhooks.dispatcher import Dispatcher
from tests.conftest import make_settings
from tests.support import (
    InProcessApi,
    auth,
    background_worker,
    complete_next_task,
    in_process_api,
    sse_items,
    submit_task,
)

SMALL = {"model": "cogview-4", "prompt": "a red fox in the snow", "size": "512*512"}
PRICE = 4  # credits per image, both qualities (the default prices)


def counts(**some: int) -> dict[str, int]:
    return {"queued": 0, "running": 0, "completed": 0, "failed": 0, "cancelled": 0, **some}


def line(i: int, **changes: Any) -> dict[str, Any]:
    return {**SMALL, "prompt": f"prompt {i}", **changes}


def submit(api: InProcessApi, key: str, requests: list[Any], **fields: Any) -> httpx.Response:
    return api.client.post(
        "/api/v1/batches", json={"requests": requests, **fields}, headers=auth(key)
    )


def data(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["code"] == 200 and body["message"] == "success"
    return body["data"]


def account(api: InProcessApi, key: str) -> dict[str, Any]:
    return dict(data(api.client.get("/api/v1/account", headers=auth(key))))


def tasks_of(api: InProcessApi, key: str, batch_id: str, **params: Any) -> list[dict[str, Any]]:
    """Every task of the batch, following the cursor."""
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": 100, **params, **({"cursor": cursor} if cursor else {})}
        page = data(
            api.client.get(f"/api/v1/batches/{batch_id}/tasks", params=query, headers=auth(key))
        )
        out += page["tasks"]
        cursor = page["next_cursor"]
        assert page["has_more"] is (cursor is not None)
        if cursor is None:
            return out


def nothing_written(api: InProcessApi, key: str, balance: int) -> None:
    assert account(api, key)["balance"] == balance
    assert data(api.client.get("/api/v1/batches", headers=auth(key)))["batches"] == []
    assert data(api.client.get("/api/v1/tasks", headers=auth(key)))["tasks"] == []


def test_a_batch_is_answered_as_a_batch_and_its_lines_become_tasks_in_order(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    requests = [line(0), line(1, n=2, quality="standard"), line(2, seed=7)]
    r = submit(api, key, requests, metadata={"campaign": "winter"})
    batch = data(r)
    assert batch["batch_id"].startswith("batch_") and batch["object"] == "batch"
    assert batch["status"] == "IN_PROGRESS" and batch["total"] == 3
    assert batch["counts"] == {
        "queued": 3,
        "running": 0,
        "completed": 0,
        "failed": 0,
        "cancelled": 0,
    }
    assert batch["images"] == {"done": 0, "total": 4}
    assert batch["credits"] == {"charged": 16, "refunded": 0}
    assert batch["finished_at"] is None and batch["callback_url"] is None
    assert batch["metadata"] == {"campaign": "winter"}
    assert account(api, key)["balance"] == 84
    batch_id = batch["batch_id"]
    assert data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key))) == batch

    tasks = tasks_of(api, key, batch_id)
    assert [t["batch_index"] for t in tasks] == [0, 1, 2]
    assert {t["batch_id"] for t in tasks} == {batch_id}
    assert [t["request"]["prompt"] for t in tasks] == ["prompt 0", "prompt 1", "prompt 2"]
    # The single submit's defaults and rules, line by line.
    assert tasks[0]["request"]["quality"] == "hd" and tasks[0]["request"]["output_format"] == "png"
    assert tasks[1]["request"]["n"] == 2 and tasks[2]["request"]["seed"] == 7
    # Every line is an ordinary task too, which says where it came from; a lone task does not.
    one = data(api.client.get(f"/api/v1/tasks/{tasks[2]['task_id']}", headers=auth(key)))
    assert one["batch_id"] == batch_id and one["batch_index"] == 2
    alone = submit_task(api.client, key)
    lone = data(api.client.get(f"/api/v1/tasks/{alone}", headers=auth(key)))
    assert "batch_id" not in lone and "batch_index" not in lone
    # Paged in line order, with the status filter of GET /api/v1/tasks.
    page = data(api.client.get(f"/api/v1/batches/{batch_id}/tasks?limit=2", headers=auth(key)))
    assert [t["batch_index"] for t in page["tasks"]] == [0, 1] and page["has_more"] is True
    assert tasks_of(api, key, batch_id, status="completed") == []
    assert len(tasks_of(api, key, batch_id, status="in_progress")) == 3


def test_a_jsonl_upload_is_a_batch_with_blank_lines_ignored(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    body = "\n".join([json.dumps(line(0)), "", "  ", json.dumps(line(1)), ""]) + "\r\n"
    for content_type in ("application/jsonl", "application/x-ndjson; charset=utf-8"):
        r = api.client.post(
            "/api/v1/batches",
            content=body.encode(),
            headers={**auth(key), "Content-Type": content_type},
        )
        batch = data(r)
        assert batch["total"] == 2 and batch["metadata"] is None
        prompts = [t["request"]["prompt"] for t in tasks_of(api, key, batch["batch_id"])]
        assert prompts == ["prompt 0", "prompt 1"]
    plain = api.client.post(
        "/api/v1/batches",
        content=body.encode(),
        headers={**auth(key), "Content-Type": "text/plain"},
    )
    assert plain.status_code == 400 and "application/jsonl" in plain.json()["error"]["message"]
    bad = api.client.post(
        "/api/v1/batches?metadata=x",
        content=body.encode(),
        headers={**auth(key), "Content-Type": "application/jsonl"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "metadata"


def test_a_bad_line_at_index_9999_refuses_the_whole_batch_and_writes_nothing(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100_000)
    requests = [line(i) for i in range(10_000)]
    requests[9_999] = line(9_999, size="1000*1000")
    r = submit(api, key, requests)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request" and error["code"] == 400
    assert error["param"] == "requests" and "9999" in error["message"]
    assert [(e["index"], e["param"]) for e in error["errors"]] == [(9_999, "size")]
    nothing_written(api, key, 100_000)


def test_every_bad_line_is_listed_with_its_index_and_field(api: InProcessApi) -> None:
    key = api.make_key(credits=1000)
    requests: list[Any] = [
        line(0),
        line(1, qualty="hd"),  # a typo
        line(2, prompt=" "),
        "not an object",
        {k: v for k, v in line(4).items() if k != "model"},
        line(5, n=5),
        line(6, prompt="nul \x00 inside"),  # valid JSON, but no database can hold it
        line(7),
    ]
    r = submit(api, key, requests)
    assert r.status_code == 400, r.text
    errors = r.json()["error"]["errors"]
    assert [(e["index"], e["param"]) for e in errors] == [
        (1, "qualty"),
        (2, "prompt"),
        (3, None),
        (4, "model"),
        (5, "n"),
        (6, "prompt"),
    ]
    assert all(e["message"] for e in errors)
    # The same messages as a single submit of the same body.
    alone = api.client.post(
        "/api/v1/images/generations", json=line(1, qualty="hd"), headers=auth(key)
    )
    assert alone.json()["error"]["message"] == errors[0]["message"]
    nothing_written(api, key, 1000)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"requests": []}, "requests"),
        ({}, "requests"),
        ({"requests": "x"}, "requests"),
        ({"requests": [SMALL], "metadata": {str(i): "v" for i in range(17)}}, "metadata"),
        ({"requests": [SMALL], "metadata": {"k": 1}}, "metadata.k"),
        ({"requests": [SMALL], "callback_url": "ftp://example.com/hook"}, "callback_url"),
        ({"requests": [SMALL], "callback_url": "http://127.0.0.1/hook"}, "callback_url"),
        ({"requests": [SMALL], "extra": 1}, "extra"),
    ],
)
def test_a_bad_batch_body_is_a_400_naming_the_field(
    api: InProcessApi, body: dict[str, Any], param: str
) -> None:
    key = api.make_key(credits=100)
    r = api.client.post("/api/v1/batches", json=body, headers=auth(key))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    nothing_written(api, key, 100)


def test_a_batch_larger_than_the_balance_is_refused_whole(api: InProcessApi) -> None:
    key = api.make_key(credits=4 * 9)
    r = submit(api, key, [line(i) for i in range(10)])
    assert r.status_code == 402, r.text
    error = r.json()["error"]
    assert error["type"] == "insufficient_credits"
    assert "40 credits" in error["message"] and "balance is 36" in error["message"]
    nothing_written(api, key, 36)
    assert data(submit(api, key, [line(i) for i in range(9)]))["total"] == 9
    assert account(api, key)["balance"] == 0


def test_a_batch_has_its_own_limits_on_requests_and_body_size(
    tmp_path: Path, tiny_cache: Path, database_url: str
) -> None:
    settings = make_settings(
        tmp_path,
        tiny_cache,
        database_url=database_url,
        batch_max_requests=80,
        batch_max_body_bytes=200_000,
    )
    with in_process_api(settings) as api:
        key = api.make_key(credits=10_000)
        # Past the 64 KiB of a single submit, within the batch's own limit.
        big = [line(i, negative_prompt="x" * 950) for i in range(80)]
        assert len(json.dumps({"requests": big})) > 64 * 1024
        assert data(submit(api, key, big))["total"] == 80
        r = submit(api, key, [line(i) for i in range(81)])
        assert r.status_code == 400 and "1 to 80 requests" in r.json()["error"]["message"]
        huge = submit(api, key, [line(i, negative_prompt="x" * 999) for i in range(300)])
        assert huge.status_code == 413, huge.text
        assert huge.json()["error"]["type"] == "request_too_large"


def test_idempotency_key_answers_the_same_batch_and_charges_once(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    headers = {**auth(key), "Idempotency-Key": "batch-1"}
    body = {"requests": [line(0), line(1)]}
    first = api.client.post("/api/v1/batches", json=body, headers=headers)
    again = api.client.post("/api/v1/batches", json=body, headers=headers)
    assert data(first)["batch_id"] == data(again)["batch_id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert "Idempotent-Replayed" not in first.headers
    assert account(api, key)["balance"] == 92
    other = api.client.post("/api/v1/batches", json={"requests": [line(0)]}, headers=headers)
    assert other.status_code == 409 and other.json()["error"]["param"] == "Idempotency-Key"
    # A task's key is not a batch's: the same key on a task submit is another request.
    task = api.client.post("/api/v1/images/generations", json=line(0), headers=headers)
    assert task.status_code == 409
    assert len(data(api.client.get("/api/v1/batches", headers=auth(key)))["batches"]) == 1


def test_cancel_mid_batch_refunds_exactly_the_unstarted_tasks(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    batch_id = data(submit(api, key, [line(i) for i in range(6)]))["batch_id"]
    assert account(api, key)["balance"] == 100 - 6 * PRICE
    complete_next_task(api)
    complete_next_task(api)
    r = api.client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth(key))
    batch = data(r)
    assert batch["status"] == "CANCELLED" and batch["finished_at"] is not None
    assert batch["counts"] == {
        "queued": 0,
        "running": 0,
        "completed": 2,
        "failed": 0,
        "cancelled": 4,
    }
    assert batch["credits"] == {"charged": 6 * PRICE, "refunded": 4 * PRICE}
    assert batch["images"] == {"done": 2, "total": 6}
    acct = account(api, key)
    assert acct["balance"] == 100 - 2 * PRICE and acct["credits_spent"] == 2 * PRICE
    with api.db.read() as conn:
        assert key_store.ledger_sum(conn, acct["key_id"]) == acct["balance"]
    states = [t["status"] for t in tasks_of(api, key, batch_id)]
    assert states == ["COMPLETED"] * 2 + ["CANCELLED"] * 4
    again = api.client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert again.status_code == 409 and again.json()["error"]["type"] == "conflict"
    assert account(api, key)["balance"] == 100 - 2 * PRICE


def test_a_batch_completes_when_its_last_task_ends_and_counts_its_failures(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    batch_id = data(submit(api, key, [line(0), line(1, prompt="oom please"), line(2)]))["batch_id"]
    complete_next_task(api)
    # A line cancelled on its own is an ordinary task cancel.
    second = tasks_of(api, key, batch_id)[2]["task_id"]
    assert data(api.client.post(f"/api/v1/tasks/{second}/cancel", headers=auth(key)))
    assert data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key)))["status"] == (
        "IN_PROGRESS"
    )
    complete_next_task(api)  # the FlakyEngine runs out of memory on "oom"
    batch = data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key)))
    assert batch["status"] == "COMPLETED" and batch["finished_at"] is not None
    assert batch["counts"] == {
        "queued": 0,
        "running": 0,
        "completed": 1,
        "failed": 1,
        "cancelled": 1,
    }
    assert batch["credits"] == {"charged": 12, "refunded": 8}
    r = api.client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert r.status_code == 409 and "COMPLETED" in r.json()["error"]["message"]


def test_another_keys_batch_is_not_found_on_every_route(api: InProcessApi) -> None:
    owner, other = api.make_key(credits=100), api.make_key(credits=100)
    batch_id = data(submit(api, owner, [line(0)]))["batch_id"]
    for method, path in [
        ("GET", ""),
        ("GET", "/tasks"),
        ("POST", "/cancel"),
        ("GET", "/events"),
        ("GET", "/archive"),
    ]:
        r = api.client.request(method, f"/api/v1/batches/{batch_id}{path}", headers=auth(other))
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"]["type"] == "not_found"
    assert data(api.client.get("/api/v1/batches", headers=auth(other)))["batches"] == []
    unknown = api.client.get("/api/v1/batches/batch_nope", headers=auth(owner))
    assert unknown.status_code == 404
    assert api.client.get(f"/api/v1/batches/{batch_id}").status_code == 401


def test_batches_are_listed_newest_first_with_a_cursor(api: InProcessApi) -> None:
    key = api.make_key(credits=100)
    ids = [data(submit(api, key, [line(i)]))["batch_id"] for i in range(3)]
    first = data(api.client.get("/api/v1/batches?limit=2", headers=auth(key)))
    assert [b["batch_id"] for b in first["batches"]] == ids[:0:-1] and first["has_more"]
    rest = data(
        api.client.get(
            "/api/v1/batches",
            params={"limit": 2, "cursor": first["next_cursor"]},
            headers=auth(key),
        )
    )
    assert [b["batch_id"] for b in rest["batches"]] == ids[:1] and rest["next_cursor"] is None
    for query in ("limit=0", "limit=101", "cursor=nonsense"):
        assert api.client.get(f"/api/v1/batches?{query}", headers=auth(key)).status_code == 400
    bad = api.client.get(f"/api/v1/batches/{ids[0]}/tasks?status=done", headers=auth(key))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "status"


def test_the_event_stream_sends_the_batch_then_each_change_then_its_end(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    batch_id = data(submit(api, key, [line(0), line(1)]))["batch_id"]
    frames: list[dict[str, Any]] = []
    with api.client.stream("GET", f"/api/v1/batches/{batch_id}/events", headers=auth(key)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for name, item in sse_items(r):
            if name == "comment":
                continue
            assert name == "batch"
            frames.append(item)
            if len(frames) == 1:
                complete_next_task(api)
                api.app.state.signals.notify()
            elif item["counts"]["completed"] == 1 and item["status"] == "IN_PROGRESS":
                api.client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert frames[0]["status"] == "IN_PROGRESS" and frames[0]["counts"]["queued"] == 2
    # One frame per change (on PostgreSQL the claim's RUNNING may be seen on its own).
    assert all(a != b for a, b in zip(frames, frames[1:], strict=False))
    assert [f["counts"]["completed"] for f in frames][-2:] == [1, 1]
    assert frames[-1]["status"] == "CANCELLED" and frames[-1]["counts"]["cancelled"] == 1
    final = data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key)))
    assert frames[-1] == final


def read_zip(r: httpx.Response) -> zipfile.ZipFile:
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/zip"
    return zipfile.ZipFile(io.BytesIO(r.content))


def test_the_archive_holds_what_has_finished_and_a_manifest_of_every_line(
    api: InProcessApi,
) -> None:
    key = api.make_key(credits=100)
    requests = [line(0, n=2), line(1, seed=42), line(2, output_format="jpeg"), line(3)]
    batch_id = data(submit(api, key, requests))["batch_id"]
    empty = read_zip(api.client.get(f"/api/v1/batches/{batch_id}/archive", headers=auth(key)))
    manifest = [json.loads(x) for x in empty.read("manifest.jsonl").decode().splitlines()]
    assert empty.namelist() == ["manifest.jsonl"]
    assert [m["status"] for m in manifest] == ["IN_PROGRESS"] * 4
    assert manifest[1]["seed"] == 42 and manifest[0]["seed"] is None
    for _ in range(3):
        complete_next_task(api)
    r = api.client.get(f"/api/v1/batches/{batch_id}/archive", headers=auth(key))
    assert r.headers["content-disposition"] == f'attachment; filename="{batch_id}.zip"'
    archive = read_zip(r)
    assert archive.namelist() == [
        "images/00000-0.png",
        "images/00000-1.png",
        "images/00001-0.png",
        "images/00002-0.jpg",
        "manifest.jsonl",
    ]
    tasks = tasks_of(api, key, batch_id)
    manifest = [json.loads(x) for x in archive.read("manifest.jsonl").decode().splitlines()]
    assert [m["index"] for m in manifest] == [0, 1, 2, 3]
    assert [m["task_id"] for m in manifest] == [t["task_id"] for t in tasks]
    assert [m["status"] for m in manifest] == [t["status"] for t in tasks]
    assert [m["prompt"] for m in manifest] == [t["request"]["prompt"] for t in tasks]
    assert [m["size"] for m in manifest] == ["512*512"] * 4
    assert [m["seed"] for m in manifest[:3]] == [t["images"][0]["seed"] for t in tasks[:3]]
    assert manifest[1]["seed"] == 42
    assert [m["files"] for m in manifest] == [
        ["images/00000-0.png", "images/00000-1.png"],
        ["images/00001-0.png"],
        ["images/00002-0.jpg"],
        [],
    ]
    assert all(m["error"] is None for m in manifest)
    # Each file is the image the task's URL serves, byte for byte.
    url = tasks[0]["images"][1]["url"].removeprefix(api.base_url)
    assert archive.read("images/00000-1.png") == api.client.get(url).content


class Receiver:
    """A loopback webhook receiver answering 204, keeping each POST's headers and body."""

    def __init__(self) -> None:
        self.posts: list[tuple[dict[str, str], bytes]] = []
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                posts.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.mark.parametrize("ending", ["completed", "cancelled"])
def test_a_batch_posts_its_signed_webhook_once_when_it_ends(
    tmp_path: Path, tiny_cache: Path, database_url: str, ending: str
) -> None:
    settings = make_settings(
        tmp_path, tiny_cache, database_url=database_url, webhook_allow_hosts="127.0.0.1"
    )
    receiver = Receiver()
    try:
        with in_process_api(settings) as api:
            made, key = key_service.create_key(api.db, name="hooks", credits=100)
            hook = receiver.url
            batch_id = data(submit(api, key, [line(0), line(1)], callback_url=hook))["batch_id"]
            dispatcher = Dispatcher(
                settings=settings,
                db=api.db,
                render=webhook_payload(settings),
                render_batch=batch_webhook_payload(),
            )
            assert dispatcher.run_once() == 0  # nothing until the batch ends
            complete_next_task(api)
            if ending == "cancelled":
                api.client.post(f"/api/v1/batches/{batch_id}/cancel", headers=auth(key))
            else:
                complete_next_task(api)
            assert dispatcher.run_once() == 1
            assert dispatcher.run_once() == 0  # delivered: never sent again
            final = data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key)))
            secret = key_service.webhook_secret(api.db, made.id)
    finally:
        receiver.httpd.shutdown()
        receiver.httpd.server_close()
    ((headers, body),) = receiver.posts
    payload = json.loads(body)
    assert payload["type"] == f"batch.{ending}" and payload["timestamp"]
    assert payload["data"] == final and final["status"] == ending.upper()
    expected = signing.sign(secret, headers["webhook-id"], int(headers["webhook-timestamp"]), body)
    assert headers["webhook-signature"] == expected


def test_the_archive_of_a_200_image_batch_streams_without_holding_the_batch(
    api: InProcessApi, tmp_path: Path
) -> None:
    """50 lines of 4 images of noise (engine/echo.py: files no encoder can shrink), then the
    archive downloaded to a file while tracemalloc counts what this process (the server, in a
    thread here) holds: at most a few images' worth, never the batch's tens of megabytes."""
    key = api.make_key(credits=1000)
    requests = [
        line(i, prompt=f"{NOISE_MARKER} line {i}", n=4, output_format="jpeg") for i in range(50)
    ]
    batch_id = data(submit(api, key, requests))["batch_id"]
    with background_worker(api, engine=EchoEngine(api.settings)):
        deadline = time.monotonic() + 300
        while (
            data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(key)))["status"]
            != "COMPLETED"
        ):
            assert time.monotonic() < deadline, "the batch did not finish"
            time.sleep(0.2)
    tasks = tasks_of(api, key, batch_id)
    path = tmp_path / "batch.zip"
    tracemalloc.start()
    try:
        base, _ = tracemalloc.get_traced_memory()
        with (
            api.client.stream("GET", f"/api/v1/batches/{batch_id}/archive", headers=auth(key)) as r,
            path.open("wb") as out,
        ):
            assert r.status_code == 200
            for chunk in r.iter_bytes():
                out.write(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    archive = zipfile.ZipFile(path)
    names = archive.namelist()
    images = [n for n in names if n.startswith("images/")]
    assert len(images) == 200 and names[-1] == "manifest.jsonl"
    sizes = [archive.getinfo(n).file_size for n in images]
    total = sum(sizes)
    assert total > 40 * 2**20  # the batch's images: tens of megabytes
    held = peak - base
    assert held < 8 * max(sizes) + 4 * 2**20, (held, max(sizes), total)
    assert held < total / 4
    manifest = [json.loads(x) for x in archive.read("manifest.jsonl").decode().splitlines()]
    assert [m["task_id"] for m in manifest] == [t["task_id"] for t in tasks]
    assert all(m["status"] == "COMPLETED" and m["error"] is None for m in manifest)
    for m, t in zip(manifest, tasks, strict=True):
        assert m["seed"] == t["images"][0]["seed"]
        assert m["files"] == [f"images/{m['index']:05d}-{k}.jpg" for k in range(4)]
    assert archive.testzip() is None  # every member's CRC-32 checks
    first = tasks[0]["images"][0]["url"].removeprefix(api.base_url)
    assert archive.read("images/00000-0.jpg") == api.client.get(first).content


def test_an_interactive_submit_after_a_1000_task_batch_starts_before_its_remaining_tasks(
    api: InProcessApi,
) -> None:
    owner, other = api.make_key(credits=5000), api.make_key(credits=100)
    batch_id = data(submit(api, owner, [line(i) for i in range(1000)]))["batch_id"]
    complete_next_task(api)  # the batch alone waits: its first line runs
    # Submits of both keys after it: not held to the waiting limits by the batch's tasks
    # (COGVIEW_MAX_WAITING_PER_KEY 100, COGVIEW_MAX_QUEUE 1000), and first in the queue.
    mine = submit_task(api.client, owner, size="1024*1024")
    theirs = submit_task(api.client, other, size="1024*1024")
    positions = [
        data(api.client.get(f"/api/v1/tasks/{t}", headers=auth(k)))["progress"]["queue_position"]
        for t, k in ((mine, owner), (theirs, other))
    ]
    assert positions == [1, 2]
    second = tasks_of(api, owner, batch_id, status="in_progress")[0]
    assert second["batch_index"] == 1 and second["progress"]["queue_position"] == 3
    complete_next_task(api)
    complete_next_task(api)
    for task_id, key in ((mine, owner), (theirs, other)):
        done = data(api.client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)))
        assert done["status"] == "COMPLETED"
    batch = data(api.client.get(f"/api/v1/batches/{batch_id}", headers=auth(owner)))
    assert batch["counts"] == counts(completed=1, queued=999)
    complete_next_task(api)  # then the batch goes on, in line order
    assert [t["batch_index"] for t in tasks_of(api, owner, batch_id, status="completed")] == [0, 1]


def test_openapi_shows_every_batch_route_with_examples(api: InProcessApi) -> None:
    paths = api.client.get("/openapi.json").json()["paths"]
    routes = {
        ("post", "/api/v1/batches"),
        ("get", "/api/v1/batches"),
        ("get", "/api/v1/batches/{batch_id}"),
        ("get", "/api/v1/batches/{batch_id}/tasks"),
        ("post", "/api/v1/batches/{batch_id}/cancel"),
        ("get", "/api/v1/batches/{batch_id}/events"),
        ("get", "/api/v1/batches/{batch_id}/archive"),
    }
    for method, path in routes:
        op = paths[path][method]
        assert op["summary"] and "500" in op["responses"], (method, path)
        if path.endswith("/archive"):
            continue
        (media,) = op["responses"]["200"]["content"].values()
        assert "example" in media or "examples" in media, (method, path)
    body = paths["/api/v1/batches"]["post"]["requestBody"]["content"]
    assert set(body) == {"application/json", "application/jsonl"}
    assert "$ref" not in json.dumps(body["application/json"]["schema"])  # self-contained
    assert body["application/json"]["examples"]


def test_batch_streams_share_the_keys_stream_cap_with_task_streams(
    tmp_path: Path, tiny_cache: Path, database_url: str
) -> None:
    settings = make_settings(
        tmp_path,
        tiny_cache,
        database_url=database_url,
        max_streams_per_key=1,
        sse_keepalive_seconds=0.3,  # a client that left is noticed at the next write
    )
    with in_process_api(settings) as api:
        key = api.make_key(credits=100)
        batch_id = data(submit(api, key, [line(0)]))["batch_id"]
        task_id = submit_task(api.client, key)
        with api.client.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r:
            assert r.status_code == 200
            refused = api.client.get(f"/api/v1/batches/{batch_id}/events", headers=auth(key))
            assert refused.status_code == 429, refused.text
            assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        deadline = time.monotonic() + 10  # the slot comes back once the server sees it closed
        while True:
            with api.client.stream(
                "GET", f"/api/v1/batches/{batch_id}/events", headers=auth(key)
            ) as r:
                if r.status_code == 200:
                    assert next(sse_items(r))[0] == "batch"
                    return
                assert r.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.1)
