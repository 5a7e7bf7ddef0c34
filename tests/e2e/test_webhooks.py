"""Webhooks end to end: `cogview-api serve --workers 0` (the API process alone still delivers)
POSTs each settled task to a real receiver on loopback, which the operator allow-lists and which
fails the first two attempts of every delivery. Tasks are completed by a worker loop in this
process on the same database, as a separate `cogview-api worker` would."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from cogview_api.config import Settings
from cogview_api.storage import open_storage
from cogview_api.store.db import Database
from cogview_api.worker.loop import Worker
from tests.support import FlakyEngine, ServerProcess, auth, server_env, submit_task

FAILURES_FIRST = 2  # the receiver answers 500 this many times per webhook-id, then 200


@dataclass(frozen=True)
class Call:
    path: str
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def task_id(self) -> str:
        return str(json.loads(self.body)["task_id"])


class Receiver:
    """A webhook receiver: a real HTTP server in a thread, recording every POST."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                headers = {k.lower(): v for k, v in self.headers.items()}
                with receiver.lock:
                    seen = sum(
                        c.headers.get("webhook-id") == headers.get("webhook-id")
                        for c in receiver.calls
                    )
                    status = 500 if seen < FAILURES_FIRST else 200
                    receiver.calls.append(Call(self.path, headers, body, status))
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def calls_for(self, task_id: str) -> list[Call]:
        with self.lock:
            return [c for c in self.calls if c.task_id == task_id]


def verify(secret: str, call: Call) -> bool:
    """Standard Webhooks verification, written from the spec (not the server's code)."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    msg_id, stamp = call.headers["webhook-id"], call.headers["webhook-timestamp"]
    signed = f"{msg_id}.{stamp}.".encode() + call.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    sent = [s.removeprefix("v1,") for s in call.headers["webhook-signature"].split()]
    timely = abs(time.time() - int(stamp)) < 300
    return timely and any(hmac.compare_digest(s, expected) for s in sent)


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.httpd.shutdown()


@pytest.fixture(scope="module")
def hook_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path
) -> Iterator[ServerProcess]:
    """An API-only server whose operator allows loopback callbacks, retrying every 0.2 s."""
    workdir = tmp_path_factory.mktemp("webhooks")
    env = server_env(
        tiny_cache,
        {
            "COGVIEW_DATABASE_URL": f"sqlite:///{workdir}/cogview.db",
            "COGVIEW_STORAGE_URL": f"file://{workdir}/images",
            "COGVIEW_WEBHOOK_ALLOW_HOSTS": "127.0.0.1",
            "COGVIEW_WEBHOOK_RETRY_SCHEDULE": "0.2,0.2,0.2,0.2",
            "COGVIEW_WEBHOOK_POLL_SECONDS": "0.1",
        },
    )
    proc = ServerProcess(workdir=workdir, env=env, args=("--workers", "0"))
    with proc.start(wait_ready=False) as proc:  # no worker in it, so never "ready"; it is alive
        yield proc


@pytest.fixture
def client(hook_server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=hook_server.base_url, timeout=30) as c:
        yield c


def run_one_task(server: ServerProcess) -> None:
    """Complete the oldest waiting task with a worker loop on the server's database."""
    env = server.env
    settings = Settings(
        database_url=env["COGVIEW_DATABASE_URL"], storage_url=env["COGVIEW_STORAGE_URL"]
    )
    db = Database(settings.database_url)
    try:
        worker = Worker(
            settings=settings,
            db=db,
            storage=open_storage(settings.storage_url),
            engine=FlakyEngine(),
        )
        assert worker.run_once()
    finally:
        db.dispose()


def settled_webhook(client: httpx.Client, task_id: str, key: str) -> dict[str, Any]:
    """The task once its webhook is no longer pending."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        data: dict[str, Any] = client.get(f"/api/v1/tasks/{task_id}", headers=auth(key)).json()[
            "data"
        ]
        if data["webhook"] is not None and data["webhook"]["status"] != "pending":
            return data
        time.sleep(0.1)
    raise TimeoutError(f"the webhook of {task_id} did not settle")


def test_a_completed_task_is_delivered_once_signed_after_two_failures(
    hook_server: ServerProcess, receiver: Receiver, client: httpx.Client
) -> None:
    key = hook_server.make_key(credits=100)
    assert key["webhook_secret"].startswith("whsec_")
    task_id = submit_task(client, key["key"], callback_url=receiver.url("/hooks/done"))
    run_one_task(hook_server)
    task = settled_webhook(client, task_id, key["key"])

    calls = receiver.calls_for(task_id)
    assert [c.status for c in calls] == [500, 500, 200]
    assert {c.headers["webhook-id"] for c in calls} == {task["webhook"]["id"]}
    assert all(c.path == "/hooks/done" for c in calls)
    assert all(verify(key["webhook_secret"], c) for c in calls)
    assert not verify(hook_server.make_key()["webhook_secret"], calls[0])  # another key's secret
    assert len({c.body for c in calls}) == 1  # every retry sends the same payload
    payload = json.loads(calls[0].body)
    assert payload == {k: v for k, v in task.items() if k != "webhook"}
    assert payload["status"] == "COMPLETED"
    assert payload["images"][0]["url"].startswith(hook_server.base_url + "/images/")
    assert httpx.get(payload["images"][0]["url"]).status_code == 200

    hook = task["webhook"]
    assert (hook["event"], hook["status"], hook["next_attempt_at"]) == (
        "task.completed",
        "delivered",
        None,
    )
    assert [(a["number"], a["status_code"]) for a in hook["attempts"]] == [
        (1, 500),
        (2, 500),
        (3, 200),
    ]
    time.sleep(1)  # several dispatcher polls: a delivered webhook is not sent again
    assert len(receiver.calls_for(task_id)) == 3


def test_cancel_sends_only_the_webhooks_that_were_asked_for(
    hook_server: ServerProcess, receiver: Receiver, client: httpx.Client
) -> None:
    key = hook_server.make_key(credits=100)
    rotated = json.loads(
        hook_server.cli("keys", "rotate-webhook-secret", key["id"], "--json").stdout
    )["webhook_secret"]
    assert rotated != key["webhook_secret"]
    quiet = submit_task(client, key["key"])
    loud = submit_task(client, key["key"], callback_url=receiver.url("/hooks/cancelled"))
    for task_id in (quiet, loud):  # both still waiting: this server has no worker
        r = client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key["key"]))
        assert r.json()["data"]["status"] == "CANCELLED"
    task = settled_webhook(client, loud, key["key"])

    calls = receiver.calls_for(loud)
    assert [c.status for c in calls] == [500, 500, 200]
    assert all(verify(rotated, c) and not verify(key["webhook_secret"], c) for c in calls)
    assert json.loads(calls[-1].body)["status"] == "CANCELLED"
    assert task["webhook"]["event"] == "task.cancelled"
    quiet_task = client.get(f"/api/v1/tasks/{quiet}", headers=auth(key["key"])).json()["data"]
    assert quiet_task["status"] == "CANCELLED" and quiet_task["webhook"] is None
    assert receiver.calls_for(quiet) == []


@pytest.fixture(scope="module")
def refused_key(hook_server: ServerProcess) -> dict[str, Any]:
    """One key for all the refusals: each must leave it as it was."""
    return hook_server.make_key(credits=100, name="refused")


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.2:8080/hook",  # loopback, but not the allow-listed address
        "http://[::1]/hook",
        "http://10.0.0.1/hook",
        "http://192.168.0.10/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/hook",
        "http://0.0.0.0/hook",
        "ftp://127.0.0.1/hook",
    ],
)
def test_internal_callback_urls_are_refused_and_nothing_is_charged(
    refused_key: dict[str, Any], client: httpx.Client, url: str
) -> None:
    key = refused_key
    r = client.post(
        "/api/v1/images/generations",
        json={"model": "cogview-4", "prompt": "a cat", "callback_url": url},
        headers=auth(key["key"]),
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request"
    assert r.json()["error"]["param"] == "callback_url"
    assert client.get("/api/v1/account", headers=auth(key["key"])).json()["data"]["balance"] == 100
    assert client.get("/api/v1/tasks", headers=auth(key["key"])).json()["data"]["tasks"] == []


def test_keys_create_shows_the_signing_secret(hook_server: ServerProcess) -> None:
    out = hook_server.cli("keys", "create", "--name", "human").stdout
    assert "webhook signing secret (shown once" in out and "whsec_" in out
