"""Open event streams and `Prefer: wait` requests (issue 11, finding 3): capped per key with a
429 before anything is written, a slot given back when the request ends, and followed by one
watcher per process that reads once for all of them, so an idle stream costs no reads."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import event, select

from cogview_api.config import Settings
from cogview_api.engine import EngineJob, ProgressFn
from cogview_api.services import keys as key_service
from cogview_api.services.follow_limits import FollowLimits
from cogview_api.services.watch import TaskWatcher
from cogview_api.storage import open_storage
from cogview_api.store.tables import admin_audit
from cogview_api.worker.loop import Worker
from tests.api.test_bad_input import assert_error
from tests.support import (
    CLI,
    EXAMPLE_BODY,
    InProcessApi,
    auth,
    background_worker,
    in_process_api,
    sse_items,
    submit_task,
)

MAX_STREAMS, MAX_WAITS = 2, 1


@pytest.fixture
def api(settings: Settings) -> Iterator[InProcessApi]:
    caps = {
        "max_streams_per_key": MAX_STREAMS,
        "max_waits_per_key": MAX_WAITS,
        # A client that left is noticed at the next write: soon, for the slot tests.
        "sse_keepalive_seconds": 0.3,
    }
    with in_process_api(settings.model_copy(update=caps)) as running:
        yield running


def watcher(api: InProcessApi) -> TaskWatcher:
    w: TaskWatcher = api.app.state.watcher
    return w


@contextmanager
def open_stream(api: InProcessApi, key: str, task_id: str) -> Iterator[Iterator[Any]]:
    """A stream whose first frame has arrived (so the server holds it open)."""
    with (
        httpx.Client(base_url=api.base_url, timeout=30) as c,
        c.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r,
    ):
        assert r.status_code == 200, r.read()
        items = sse_items(r)
        assert next(items)[0] == "task"
        yield items


def until(check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_streams_over_the_cap_get_429_and_a_closed_stream_frees_its_slot(
    api: InProcessApi,
) -> None:
    key, other = api.make_key(name="many"), api.make_key(name="other")
    task_id = submit_task(api.client, key)
    path = f"/api/v1/tasks/{task_id}/events"
    with ExitStack() as streams:
        for _ in range(MAX_STREAMS):
            streams.enter_context(open_stream(api, key, task_id))
        refused = api.client.get(path, headers=auth(key))
        assert_error(refused, 429, "rate_limit_exceeded")
        assert refused.headers["retry-after"] == "5"
        assert "COGVIEW_MAX_STREAMS_PER_KEY" in refused.json()["error"]["message"]
        # Another key's streams are its own.
        other_task = submit_task(api.client, other)
        with open_stream(api, other, other_task):
            pass
    # All closed: the server notices at its next keep-alive and gives the slots back.
    until(lambda: watcher(api).subscribers(task_id) == 0)
    with ExitStack() as streams:
        for _ in range(MAX_STREAMS):
            streams.enter_context(open_stream(api, key, task_id))


def test_a_refused_or_failed_stream_holds_no_slot(api: InProcessApi) -> None:
    key = api.make_key()
    task_id = submit_task(api.client, key)
    for _ in range(MAX_STREAMS + 1):  # 404s give their slot back
        r = api.client.get("/api/v1/tasks/nope_cv4/events", headers=auth(key))
        assert_error(r, 404, "not_found")
    with ExitStack() as streams:
        for _ in range(MAX_STREAMS):
            streams.enter_context(open_stream(api, key, task_id))


def test_waits_over_the_cap_get_429_and_nothing_is_charged(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    waited: list[httpx.Response] = []

    def wait() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as c:
            waited.append(
                c.post(
                    "/api/v1/images/generations",
                    json=EXAMPLE_BODY,
                    headers={**auth(key), "Prefer": "wait=20"},
                )
            )

    holder = threading.Thread(target=wait)
    holder.start()
    until(lambda: api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"])
    (first,) = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    refused = api.client.post(
        "/api/v1/images/generations", json=EXAMPLE_BODY, headers={**auth(key), "Prefer": "wait=5"}
    )
    assert_error(refused, 429, "rate_limit_exceeded")
    assert refused.headers["retry-after"] == "5"
    assert "COGVIEW_MAX_WAITS_PER_KEY" in refused.json()["error"]["message"]
    account = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
    assert account["balance"] == 40 - 4  # the first task's price only
    listed = api.client.get("/api/v1/tasks", headers=auth(key)).json()["data"]["tasks"]
    assert [t["task_id"] for t in listed] == [first["task_id"]]
    # A submit without a wait is not a wait.
    submit_task(api.client, key)
    # The waiting request ends (its task cancelled): its slot is free again.
    api.client.post(f"/api/v1/tasks/{first['task_id']}/cancel", headers=auth(key))
    holder.join(timeout=10)
    assert waited[0].json()["data"]["status"] == "CANCELLED"
    again = api.client.post(
        "/api/v1/images/generations", json=EXAMPLE_BODY, headers={**auth(key), "Prefer": "wait=1"}
    )
    assert again.status_code == 200, again.text


class GatedEngine:
    """One denoising step, then waits for `go` before it draws the images."""

    name = "gated"
    device = "cpu"

    def __init__(self) -> None:
        self.go = threading.Event()

    def generate(self, jobs: Sequence[EngineJob], progress: ProgressFn) -> list[list[Image.Image]]:
        for job in jobs:
            progress(job.task_id, "denoising", 1)
        assert self.go.wait(30)
        return [[Image.new("RGB", (j.width, j.height), "gray") for _ in j.seeds] for j in jobs]


def test_every_stream_of_a_task_gets_its_progress_and_its_end(settings: Settings) -> None:
    many = 6
    caps = {"max_streams_per_key": many}
    with in_process_api(settings.model_copy(update=caps)) as api:
        key = api.make_key()
        task_id = submit_task(api.client, key)
        frames: list[list[dict[str, Any]]] = [[] for _ in range(many)]

        def follow(into: list[dict[str, Any]]) -> None:
            with (
                httpx.Client(base_url=api.base_url, timeout=30) as c,
                c.stream("GET", f"/api/v1/tasks/{task_id}/events", headers=auth(key)) as r,
            ):
                into.extend(value for kind, value in sse_items(r) if kind == "task")

        threads = [threading.Thread(target=follow, args=(f,)) for f in frames]
        for t in threads:
            t.start()
        until(lambda: watcher(api).subscribers(task_id) == many)
        engine = GatedEngine()
        with background_worker(api, engine):
            until(lambda: all(f and f[-1]["progress"]["step"] == 1 for f in frames))
            engine.go.set()
            for t in threads:
                t.join(timeout=20)
        for f in frames:
            assert f[0]["status"] == "IN_PROGRESS" and f[0]["progress"]["stage"] == "queued"
            assert any(x["progress"]["stage"] == "denoising" for x in f)
            assert f[-1]["status"] == "COMPLETED" and len(f[-1]["images"]) == 1
        assert watcher(api).subscribers(task_id) == 0


def test_idle_streams_cost_one_shared_read_per_look(api: InProcessApi) -> None:
    keys = [api.make_key(name=f"k{i}") for i in range(3)]
    tasks = [submit_task(api.client, k) for k in keys for _ in range(MAX_STREAMS)]
    statements: list[tuple[str, Any]] = []

    def record(conn: Any, cursor: Any, sql: str, params: Any, *args: Any) -> None:
        statements.append((sql, params))

    with ExitStack() as streams:
        for i, task_id in enumerate(tasks):
            streams.enter_context(open_stream(api, keys[i // MAX_STREAMS], task_id))
        w = watcher(api)
        until(lambda: not w._fresh)  # the first look, which reads new tasks in full, is done
        time.sleep(0.3)  # and its reads are over
        event.listen(api.db.engine, "before_cursor_execute", record)
        try:
            for _ in range(4):
                w.poke()
                time.sleep(0.2)
        finally:
            event.remove(api.db.engine, "before_cursor_execute", record)
    assert statements, "the watcher did not look"
    for sql, params in statements:
        assert "queue_head" in sql  # the watcher's one statement, nothing per stream
        bound = set(params.values() if isinstance(params, dict) else params)
        assert set(tasks) <= bound  # all six streams' tasks in it


def test_the_stream_cap_holds_across_api_processes(api: InProcessApi) -> None:
    """Two apps on one database (as two replicas): the slots of one count in the other."""
    key = api.make_key()
    task_id = submit_task(api.client, key)
    with in_process_api(api.settings) as replica, ExitStack() as streams:
        for _ in range(MAX_STREAMS):
            streams.enter_context(open_stream(api, key, task_id))
        refused = replica.client.get(f"/api/v1/tasks/{task_id}/events", headers=auth(key))
        assert_error(refused, 429, "rate_limit_exceeded")


def test_slots_of_a_process_that_died_lapse(api: InProcessApi) -> None:
    key = api.make_key()
    task_id = submit_task(api.client, key)
    dead = FollowLimits(api.db, max_streams=MAX_STREAMS, max_waits=MAX_WAITS, lease_s=0.2)
    for _ in range(MAX_STREAMS):
        dead.take("stream", key)  # never given back, never renewed (dead.close())
    dead.close()
    refused = api.client.get(f"/api/v1/tasks/{task_id}/events", headers=auth(key))
    assert_error(refused, 429, "rate_limit_exceeded")
    time.sleep(0.3)  # past their lease
    with open_stream(api, key, task_id):
        pass


def test_on_postgres_the_watcher_learns_from_notify_not_a_poll(settings: Settings) -> None:
    """A worker and a revoke that do not signal this process (as from other processes), and a
    fallback look far beyond the test: progress, the end and a revocation still arrive, by
    LISTEN/NOTIFY."""
    if not settings.database_url.startswith("postgresql"):
        pytest.skip("SQLite has no NOTIFY: there the watcher's tick is the way (tests above)")
    slow = {"watch_fallback_seconds": 60.0, "max_streams_per_key": 5}
    with in_process_api(settings.model_copy(update=slow)) as api:
        key, doomed = api.make_key(name="runs"), api.make_key(name="doomed")
        task_id, doomed_task = submit_task(api.client, key), submit_task(api.client, doomed)
        frames: list[dict[str, Any]] = []
        ended: list[str] = []

        def follow(k: str, t: str, into: list[dict[str, Any]]) -> None:
            with (
                httpx.Client(base_url=api.base_url, timeout=30) as c,
                c.stream("GET", f"/api/v1/tasks/{t}/events", headers=auth(k)) as r,
            ):
                into.extend(value for kind, value in sse_items(r) if kind == "task")
            ended.append(t)

        threads = [
            threading.Thread(target=follow, args=(key, task_id, frames)),
            threading.Thread(target=follow, args=(doomed, doomed_task, [])),
        ]
        for t in threads:
            t.start()
        until(lambda: watcher(api).subscribers(task_id) == 1)
        until(lambda: watcher(api).subscribers(doomed_task) == 1)
        engine = GatedEngine()
        worker = Worker(
            settings=api.settings,
            db=api.db,
            storage=open_storage(api.settings.storage_url),
            engine=engine,  # no on_changed: nothing in this process is told
        )
        runner = threading.Thread(target=worker.run_once)
        runner.start()
        until(lambda: bool(frames) and frames[-1]["progress"]["stage"] == "denoising")
        engine.go.set()
        runner.join(timeout=20)
        until(lambda: task_id in ended)
        assert frames[-1]["status"] == "COMPLETED"
        doomed_id = next(k.id for k in key_service.list_keys(api.db) if k.name == "doomed")
        key_service.revoke_key(api.db, doomed_id)
        until(lambda: doomed_task in ended)
        for t in threads:
            t.join(timeout=10)


def test_a_key_with_its_own_cap(api: InProcessApi, tmp_path: Path) -> None:
    """`cogview-api keys follow-limits` gives one key its own caps; the others keep the
    settings'. Out-of-range values are refused with one sentence."""
    own, other = api.make_key(name="own"), api.make_key(name="other")
    own_id = next(k.id for k in key_service.list_keys(api.db) if k.name == "own")
    env = {
        **os.environ,
        "COGVIEW_DATABASE_URL": api.settings.database_url,
        "COGVIEW_MAX_STREAMS_PER_KEY": str(MAX_STREAMS),
    }

    def follow_limits(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, "keys", "follow-limits", own_id, *args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    shown = follow_limits()
    assert shown.returncode == 0, shown.stderr
    assert f"max streams {MAX_STREAMS} (default)" in shown.stdout
    assert follow_limits("--max-streams", "1").returncode == 0
    refused = follow_limits("--max-streams", "0")
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1] == (
        "cogview-api: The max streams must be from 1 to 100000; got 0."
    )
    own_task, other_task = submit_task(api.client, own), submit_task(api.client, other)
    with open_stream(api, own, own_task):
        r = api.client.get(f"/api/v1/tasks/{own_task}/events", headers=auth(own))
        assert_error(r, 429, "rate_limit_exceeded")
        assert "its own cap" in r.json()["error"]["message"]
        with open_stream(api, other, other_task), open_stream(api, other, other_task):
            pass
    assert follow_limits("--reset").returncode == 0
    with open_stream(api, own, own_task), open_stream(api, own, own_task):
        pass
    # Its changes are in the audit log as `cli:<user>`, as those of `keys limits`; a read is not.
    with api.db.read() as conn:
        rows = conn.execute(
            select(admin_audit.c.actor, admin_audit.c.action).where(admin_audit.c.key_id == own_id)
        ).all()
    assert [r.action for r in rows] == ["keys.limits.set", "keys.limits.reset"]
    assert all(r.actor.startswith("cli") for r in rows)


def test_the_watcher_counts_queue_positions_as_get_does(settings: Settings) -> None:
    """Batches of 2: key a's two tasks make the first batch, so b's task is 3rd (one task a
    claim would put it 2nd, after a's first). A stream's later frames (the watcher's reads) say
    what GET and the first frame say."""
    with in_process_api(settings.model_copy(update={"max_batch_size": 2})) as api:
        a, b = api.make_key(name="a"), api.make_key(name="b")
        tasks = [submit_task(api.client, a), submit_task(api.client, a), submit_task(api.client, b)]
        got = api.client.get(f"/api/v1/tasks/{tasks[-1]}", headers=auth(b)).json()
        seen = watcher(api)._look(tasks, set(tasks), {}, None)
        assert [seen.full[t].queue_position for t in tasks] == [1, 2, 3]
        assert got["data"]["progress"]["queue_position"] == 3


def test_a_look_that_fails_unexpectedly_does_not_end_the_watcher(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not a CogviewError (a raw driver error, a bug): logged, and the next look goes on, so
    the streams of the process still get their frames."""
    from cogview_api.services import watch

    key = api.make_key()
    task_id = submit_task(api.client, key)
    real, failed = watch.task_store.watch_look, threading.Event()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    with open_stream(api, key, task_id) as items:
        monkeypatch.setattr(watch.task_store, "watch_look", flaky)
        watcher(api).poke()
        until(failed.is_set)
        r = api.client.post(f"/api/v1/tasks/{task_id}/cancel", headers=auth(key))
        assert r.status_code == 200, r.text
        last, deadline = None, time.monotonic() + 20  # keep-alives come every 0.3 s
        for kind, value in items:
            if kind == "task":
                last = value
            if last and last["status"] == "CANCELLED" or time.monotonic() > deadline:
                break
    assert last is not None and last["status"] == "CANCELLED"


def test_a_renewal_that_fails_unexpectedly_does_not_end_the_renewer(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cogview_api.services import follow_limits
    from cogview_api.store import follow_slots as slot_store

    made, key = key_service.create_key(api.db, name="renewed", credits=10)
    key_id = made.id
    real, failed = slot_store.renew, threading.Event()

    def flaky(*args: Any, **kwargs: Any) -> Any:
        if not failed.is_set():
            failed.set()
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(follow_limits.slot_store, "renew", flaky)
    limits = FollowLimits(api.db, max_streams=MAX_STREAMS, max_waits=MAX_WAITS, lease_s=0.3)
    try:
        slot = limits.take("stream", key)
        until(failed.is_set)
        time.sleep(0.6)  # two leases: renewed since, or lapsed
        with api.db.write() as conn:
            assert slot_store.held(conn, key_id=key_id, kind="stream") == 1
        slot.release()
    finally:
        limits.close()


def test_a_slot_whose_give_back_failed_is_not_renewed(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewal is by the ids still held: a slot whose delete failed lapses with its lease,
    while the process's other slots live on."""
    from cogview_api.errors import ServiceUnavailable
    from cogview_api.services import follow_limits
    from cogview_api.store import follow_slots as slot_store

    made, key = key_service.create_key(api.db, name="lapsing", credits=10)
    limits = FollowLimits(api.db, max_streams=MAX_STREAMS, max_waits=MAX_WAITS, lease_s=0.3)
    try:
        kept, failed = limits.take("stream", key), limits.take("stream", key)

        def away(*args: Any, **kwargs: Any) -> None:
            raise ServiceUnavailable("the database is away")

        monkeypatch.setattr(follow_limits.slot_store, "release", away)
        failed.release()
        monkeypatch.undo()
        time.sleep(0.6)  # two leases, renewed three times each
        with api.db.write() as conn:
            assert slot_store.held(conn, key_id=made.id, kind="stream") == 1
        kept.release()
    finally:
        limits.close()


def test_a_give_back_that_fails_unexpectedly_does_not_escape(
    api: InProcessApi, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw driver error while a slot is given back (here its table is gone: an error neither
    backend's store translates) is logged, not raised into the teardown of the stream or wait
    that held it; the slot, no longer renewed, lapses with its lease."""
    from sqlalchemy import text

    from cogview_api.store import follow_slots as slot_store

    made, key = key_service.create_key(api.db, name="teardown", credits=10)
    limits = FollowLimits(api.db, max_streams=MAX_STREAMS, max_waits=MAX_WAITS, lease_s=0.3)
    try:
        slot = limits.take("stream", key)
        with api.db.write() as conn:
            conn.execute(text("ALTER TABLE follow_slots RENAME TO follow_slots_away"))
        try:
            with caplog.at_level("ERROR", logger="cogview_api.services.follow_limits"):
                slot.release()
        finally:
            with api.db.write() as conn:
                conn.execute(text("ALTER TABLE follow_slots_away RENAME TO follow_slots"))
        assert f"could not give back slot {slot.id}" in caplog.text

        def lapsed() -> bool:
            with api.db.write() as conn:
                return slot_store.held(conn, key_id=made.id, kind="stream") == 0

        until(lapsed)
    finally:
        limits.close()


def test_a_take_cancelled_meanwhile_gives_its_slot_back(
    api: InProcessApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client went away while its slot was being taken: the slot goes back once taken."""
    import asyncio

    from cogview_api.store import follow_slots as slot_store

    made, key = key_service.create_key(api.db, name="cancelled", credits=10)
    serving = api.app.state.serving
    real, entered, go = serving.limits.take, threading.Event(), threading.Event()

    def slow(*args: Any) -> Any:
        entered.set()
        go.wait(10)
        return real(*args)

    monkeypatch.setattr(serving.limits, "take", slow)

    async def scenario() -> None:
        taking = asyncio.ensure_future(serving.take_slot("stream", key))
        await asyncio.to_thread(entered.wait, 10)
        taking.cancel()
        with pytest.raises(asyncio.CancelledError):
            await taking
        go.set()
        for _ in range(200):
            await asyncio.sleep(0.05)
            with api.db.write() as conn:
                if slot_store.held(conn, key_id=made.id, kind="stream") == 0:
                    break
        assert not serving.limits._held

    asyncio.run(scenario())
    with api.db.write() as conn:
        assert slot_store.held(conn, key_id=made.id, kind="stream") == 0
