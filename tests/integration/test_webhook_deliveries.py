"""Webhook deliveries on each backend: every terminal transition of a task that asked for a
webhook writes exactly one delivery in its own transaction; dispatchers claim each attempt
once, retry on schedule, give up at the end of it, and re-check the target at delivery."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import func, select

from cogview_api.api.present import webhook_payload
from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import ApiKey, GenerationRequest, Size, Task, TaskState
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.services.metrics import queue_snapshot
from cogview_api.storage import open_storage
from cogview_api.store import queue
from cogview_api.store import tasks as task_store
from cogview_api.store import webhooks as delivery_store
from cogview_api.store.db import Database
from cogview_api.store.tables import webhook_deliveries
from cogview_api.webhooks.dispatcher import Dispatcher
from cogview_api.worker.loop import Worker
from tests.support import FlakyEngine, free_port

ATTEMPTS = "cogview_webhook_attempts_total"

HOOK = "http://127.0.0.1:{port}/hook"


@pytest.fixture
def hooked(settings: Settings) -> Settings:
    """Settings whose operator allows callbacks to loopback, with instant retries."""
    return settings.model_copy(
        update={"webhook_allow_hosts": "127.0.0.1", "webhook_retry_schedule": "0,0"}
    )


def submit(db: Database, settings: Settings, key: ApiKey, callback: str | None) -> Task:
    request = GenerationRequest(
        model="cogview-4",
        prompt="a cat",
        size=Size(1024, 1024),
        quality="hd",
        n=1,
        callback_url=callback,
    )
    return generation.submit(db, settings, key=key, request=request, base_url="http://api.test")


def task(db: Database, task_id: str) -> Task:
    with db.read() as conn:
        return task_store.get_task(conn, task_id)


def test_every_terminal_path_writes_one_delivery_for_tasks_that_asked(
    db: Database, hooked: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    url = HOOK.format(port=free_port())
    # Abandoned by its worker on its last attempt: failed by the lease reclaim.
    abandoned = submit(db, hooked.model_copy(update={"max_attempts": 1}), key, url)
    with db.write() as conn:
        assert queue.claim_batch(conn, worker_id="w0", limit=1, lease_seconds=1) == [abandoned.id]
    with db.write() as conn:
        assert queue.reclaim_expired(conn, now=utcnow() + timedelta(hours=1)) == (0, 1)
    # Failed by its worker.
    failed = submit(db, hooked, key, url)
    with db.write() as conn:
        queue.claim_batch(conn, worker_id="w1", limit=1, lease_seconds=30)
        task_store.fail_task(
            conn,
            task_id=failed.id,
            worker_id="w1",
            error_code=500,
            error_type="server_error",
            message="boom",
        )
    # Completed by a real worker loop.
    completed = submit(db, hooked, key, url)
    worker = Worker(
        settings=hooked, db=db, storage=open_storage(hooked.storage_url), engine=FlakyEngine()
    )
    assert worker.run_once()
    # Cancelled while waiting, with and without a callback.
    cancelled = submit(db, hooked, key, url)
    silent = submit(db, hooked, key, None)
    generation.cancel(db, key=key, task_id=cancelled.id)
    generation.cancel(db, key=key, task_id=silent.id)

    events = {
        abandoned.id: "task.failed",
        failed.id: "task.failed",
        completed.id: "task.completed",
        cancelled.id: "task.cancelled",
    }
    for task_id, event in events.items():
        hook = task(db, task_id).webhook
        assert hook is not None and hook.event == event, task_id
        assert hook.state == "pending" and hook.attempts == () and hook.id.startswith("msg_")
    assert task(db, silent.id).webhook is None
    assert task(db, completed.id).state is TaskState.COMPLETED
    with db.read() as conn:
        rows = conn.execute(select(func.count()).select_from(webhook_deliveries)).scalar_one()
    assert rows == 4


def test_a_failing_receiver_is_retried_on_schedule_then_given_up(
    db: Database, hooked: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    doomed = submit(db, hooked, key, HOOK.format(port=free_port()))  # nothing listens there
    generation.cancel(db, key=key, task_id=doomed.id)
    # The metrics: the backlog gauge's count, and each attempt by its outcome.
    assert queue_snapshot(db, hooked).webhooks_pending == 1
    before = REGISTRY.get_sample_value(ATTEMPTS, {"outcome": "transport_error"}) or 0.0
    dispatcher = Dispatcher(settings=hooked, db=db, render=webhook_payload(hooked))
    assert [dispatcher.run_once() for _ in range(4)] == [1, 1, 1, 0]  # 1 + two retries
    assert REGISTRY.get_sample_value(ATTEMPTS, {"outcome": "transport_error"}) == before + 3
    assert queue_snapshot(db, hooked).webhooks_pending == 0
    hook = task(db, doomed.id).webhook
    assert hook is not None and hook.state == "failed" and hook.next_attempt_at is None
    assert [a.number for a in hook.attempts] == [1, 2, 3]
    assert all(a.status_code is None and a.error for a in hook.attempts)


def test_the_delivery_rechecks_where_the_host_now_resolves(
    db: Database, settings: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    # Passed the check at submit (written here directly); by delivery time the name points
    # inside the network.
    with db.write() as conn:
        t, _ = task_store.insert_task(
            conn,
            key_id=key.id,
            request=GenerationRequest(
                model="cogview-4",
                prompt="x",
                size=Size(1024, 1024),
                quality="hd",
                n=1,
                callback_url="http://hooks.test/x",
            ),
            steps=1,
            guidance_scale=3.5,
            price=4,
            max_attempts=1,
            max_queue=10,
        )
    generation.cancel(db, key=key, task_id=t.id)
    rebound = Dispatcher(
        settings=settings,
        db=db,
        render=webhook_payload(settings),
        resolve=lambda h, p: ["169.254.169.254"],
    )
    assert rebound.run_once() == 1
    hook = task(db, t.id).webhook
    assert hook is not None and hook.state == "pending" and hook.next_attempt_at is not None
    (attempt,) = hook.attempts
    assert attempt.status_code is None and attempt.error is not None
    assert attempt.error.startswith("refused:") and "link-local" in attempt.error
    assert "169.254" not in attempt.error  # GET task must not map the internal DNS


def queued_hook(db: Database, key: ApiKey, url: str) -> Task:
    """A settled task whose delivery to `url` is due; written directly, past the submit check
    (the host may resolve differently at delivery)."""
    with db.write() as conn:
        t, _ = task_store.insert_task(
            conn,
            key_id=key.id,
            request=GenerationRequest(
                model="cogview-4",
                prompt="x",
                size=Size(1024, 1024),
                quality="hd",
                n=1,
                callback_url=url,
            ),
            steps=1,
            guidance_scale=3.5,
            price=4,
            max_attempts=1,
            max_queue=10,
        )
    generation.cancel(db, key=key, task_id=t.id)
    return t


class Receiver:
    """A loopback receiver answering 204, recording the Host header of each POST."""

    def __init__(self) -> None:
        self.hosts: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.hosts.append(self.headers.get("host", ""))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    try:
        yield running
    finally:
        running.httpd.shutdown()
        running.httpd.server_close()


def test_one_bad_target_does_not_lose_the_others_of_its_batch(
    db: Database, hooked: Settings, receiver: Receiver
) -> None:
    """An international host once made httpx raise UnicodeEncodeError (no HTTPError) out of
    run_once: the batch's other POSTs went unrecorded and were sent again after the lease."""
    key, _ = key_service.create_key(db, name="k", credits=100)
    intl = queued_hook(db, key, f"http://b\u00fccher.test:{receiver.port}/hook")
    broken = queued_hook(db, key, "http://broken.test/hook")
    plain = queued_hook(db, key, f"http://127.0.0.1:{receiver.port}/hook")

    def resolve(host: str, port: int) -> list[str]:
        if host == "broken.test":
            raise RuntimeError("resolver bug near 10.9.9.9")
        return ["127.0.0.1"]

    dispatcher = Dispatcher(settings=hooked, db=db, render=webhook_payload(hooked), resolve=resolve)
    assert dispatcher.run_once() == 3
    assert sorted(receiver.hosts) == sorted(
        [f"xn--bcher-kva.test:{receiver.port}", f"127.0.0.1:{receiver.port}"]
    )
    for t in (intl, plain):
        hook = task(db, t.id).webhook
        assert hook is not None and hook.state == "delivered", t.callback_url
        assert [a.status_code for a in hook.attempts] == [204]
    hook = task(db, broken.id).webhook
    assert hook is not None and hook.state == "pending"
    assert [(a.status_code, a.error) for a in hook.attempts] == [(None, "RuntimeError")]


class Dribbler:
    """A receiver that sends its answer's head a byte every 0.5 s, each byte well inside a
    per-read timeout, for up to 20 s; `closed` is set when the client hangs up."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
            try:
                conn.sendall(b"HTTP/1.1 200 OK\r\n")
                for _ in range(40):
                    conn.sendall(b"x")
                    if self.closed.wait(0.5):
                        return
                conn.sendall(b"-slow: 1\r\ncontent-length: 0\r\n\r\n")
                conn.settimeout(20)
                conn.recv(1)  # until the client hangs up
            except OSError:
                pass
            finally:
                self.closed.set()


def test_a_dribbling_receiver_is_cut_at_the_deadline_and_holds_up_no_other(
    db: Database, hooked: Settings, receiver: Receiver
) -> None:
    settings = hooked.model_copy(update={"webhook_timeout_seconds": 3.0})
    key, _ = key_service.create_key(db, name="k", credits=100)
    dribbler = Dribbler()
    slow = queued_hook(db, key, f"http://127.0.0.1:{dribbler.port}/hook")  # claimed first
    fast = queued_hook(db, key, f"http://127.0.0.1:{receiver.port}/hook")
    dispatcher = Dispatcher(settings=settings, db=db, render=webhook_payload(settings))
    running = threading.Thread(target=dispatcher.run_once)
    running.start()
    try:
        # The fast delivery is recorded while the slow one is still being received.
        recorded = threading.Event()
        while not recorded.wait(0.05) and running.is_alive():
            hook = task(db, fast.id).webhook
            if hook is not None and hook.state == "delivered":
                recorded.set()
        assert recorded.is_set() and not dribbler.closed.is_set()
    finally:
        running.join(timeout=30)
    assert dribbler.closed.wait(5)
    hook = task(db, slow.id).webhook
    assert hook is not None and hook.state == "pending"
    (attempt,) = hook.attempts
    assert attempt.status_code is None and attempt.error is not None
    assert attempt.error.startswith("ReadTimeout")
    dribbler.server.close()


def test_a_claim_is_taken_once_and_only_its_holder_moves_the_schedule(
    db: Database, hooked: Settings
) -> None:
    key, _ = key_service.create_key(db, name="k", credits=100)
    t = submit(db, hooked, key, HOOK.format(port=free_port()))
    generation.cancel(db, key=key, task_id=t.id)
    with db.write() as conn:
        (first,) = delivery_store.claim_due(conn, limit=5, lease_seconds=60)
        assert delivery_store.claim_due(conn, limit=5, lease_seconds=60) == []
    later = utcnow() + timedelta(seconds=61)  # the first holder's lease lapsed
    with db.write() as conn:
        (second,) = delivery_store.claim_due(conn, limit=5, lease_seconds=60, now=later)
    assert (first.id, first.number, second.number) == (second.id, 1, 2)
    with db.write() as conn:  # the late first holder records its attempt, not the schedule
        state = delivery_store.record_attempt(
            conn, delivery=first, status_code=500, error=None, retry_delays=(0.0,)
        )
    assert state == "pending"
    hook = task(db, t.id).webhook
    assert hook is not None and hook.next_attempt_at == later + timedelta(seconds=60)
    with db.write() as conn:
        state = delivery_store.record_attempt(
            conn, delivery=second, status_code=204, error=None, retry_delays=(0.0,)
        )
    assert state == "delivered"
    hook = task(db, t.id).webhook
    assert hook is not None and [a.status_code for a in hook.attempts] == [500, 204]


def test_postgres_dispatchers_skip_a_delivery_another_one_is_claiming(
    db: Database, hooked: Settings
) -> None:
    if db.dialect != "postgresql":
        pytest.skip("SQLite serializes writers: a second claim waits instead of skipping")
    key, _ = key_service.create_key(db, name="k", credits=100)
    t = submit(db, hooked, key, HOOK.format(port=free_port()))
    generation.cancel(db, key=key, task_id=t.id)
    with db.engine.connect() as one, one.begin():
        assert len(delivery_store.claim_due(one, limit=5, lease_seconds=60)) == 1
        with db.engine.connect() as two, two.begin():
            assert delivery_store.claim_due(two, limit=5, lease_seconds=60) == []
