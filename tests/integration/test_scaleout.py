"""Scale-out under load and faults, with real processes on the real throwaway PostgreSQL: several
`cogview-api worker` processes, a `cogview-api serve --workers 0` API process, SIGKILLed workers,
a restarted API, a restarted database, and one heavy API key beside a light one.

The workers run the `test-echo` engine (engine/echo.py: the Engine contract without torch, and
a log line per job so each task's engine runs can be counted): the tiny diffusers model needs
over a second per image on this 2-core machine, and these tests are about the queue.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from cogview_api.domain import ApiKey, GenerationRequest, Size, TaskState
from cogview_api.engine.echo import ECHO_MODEL, STEP_SECONDS_ENV, calls_dir
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from cogview_api.store import tasks as task_store
from cogview_api.store.db import Database
from cogview_api.store.tables import images, tasks
from tests import pg
from tests.conftest import make_settings
from tests.support import CLI, EXAMPLE_BODY, ServerProcess, auth, server_env

SQUARE = Size(1024, 1024)
SIZES = ["1024*1024", "768*1344", "1344*768", "864*1152"]
TERMINAL = [TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED]


@dataclass
class Fleet:
    """One PostgreSQL database, local image storage, and the processes of a deployment."""

    workdir: Path
    url: str
    db: Database
    env: dict[str, str]
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    api: ServerProcess | None = None

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "images"

    def start_worker(self, **env: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"worker-{len(self.workers)}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [*CLI, "worker", "--model", ECHO_MODEL],
            cwd=self.workdir,
            env={**self.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.workers.append(proc)
        return proc

    def start_api(self) -> ServerProcess:
        if self.api is None:
            self.api = ServerProcess(workdir=self.workdir, env=self.env, args=("--workers", "0"))
        return self.api.start(wait_ready=False)

    def key(self, credits: int = 10_000, name: str = "k") -> tuple[ApiKey, str]:
        return key_service.create_key(self.db, name=name, credits=credits)

    def calls(self) -> dict[int, Counter[str]]:
        """Engine runs per worker pid: task id -> how many times a batch started it."""
        out: dict[int, Counter[str]] = {}
        folder = calls_dir(self.workdir / "cache")
        for path in folder.glob("*.txt") if folder.exists() else []:
            out[int(path.stem)] = Counter(
                line.split()[0] for line in path.read_text().split("\n") if line
            )
        return out

    def all_calls(self) -> Counter[str]:
        total: Counter[str] = Counter()
        for c in self.calls().values():
            total.update(c)
        return total

    def states(self, ids: list[str] | None = None) -> dict[str, TaskState]:
        with self.db.read() as conn:
            query = select(tasks.c.id, tasks.c.state)
            if ids is not None:
                query = query.where(tasks.c.id.in_(ids))
            return {r.id: TaskState(r.state) for r in conn.execute(query)}

    def wait_until(self, what: str, done: Callable[[], bool], timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"not {what} in {timeout}s; {self.logs()}")
            for w in self.workers:
                assert w.poll() is None or w.returncode in (0, -9), self.logs()
            time.sleep(0.1)

    def wait_all_settled(self, ids: list[str], timeout: float = 90) -> dict[str, TaskState]:
        self.wait_until(
            "all settled",
            lambda: all(s in TERMINAL for s in self.states(ids).values()),
            timeout,
        )
        return self.states(ids)

    def logs(self) -> str:
        return "".join(
            f"\n--- {p.name}:\n" + p.read_text(errors="replace")[-1500:]
            for p in sorted(self.workdir.glob("*.log"))
        )

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in self.workers:
            try:
                w.wait(timeout=20)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
        if self.api is not None:
            self.api.stop()


@pytest.fixture
def fleet(tmp_path: Path, pg_cluster: pg.PgCluster) -> Iterator[Fleet]:
    url = pg_cluster.create_database(migrated=True)
    db = Database(url)
    env = server_env(
        tmp_path / "cache",
        {
            "COGVIEW_DATABASE_URL": url,
            "COGVIEW_STORAGE_URL": f"file://{tmp_path}/images",
            "COGVIEW_MODEL": ECHO_MODEL,
            "COGVIEW_MAX_BATCH_SIZE": "4",
            "COGVIEW_BATCH_TIMEOUT": "0.02",
            # Long enough that a busy 2-core machine never lets a working worker's lease lapse;
            # the fault tests shorten it where a lease must run out.
            "COGVIEW_LEASE_SECONDS": "20",
            "COGVIEW_POLL_INTERVAL": "0.5",  # the fallback; NOTIFY wakes the workers
            "COGVIEW_MAX_QUEUE": "10000",
            # One key's steady load is what these test, not its flood: no per-key limit.
            "COGVIEW_MAX_WAITING_PER_KEY": "10000",
            "COGVIEW_SUBMIT_RATE": "0",
        },
    )
    running = Fleet(workdir=tmp_path, url=url, db=db, env=env)
    try:
        yield running
    finally:
        running.stop()
        db.dispose()
        with contextlib.suppress(Exception):  # a restarted server may still be busy with it
            pg_cluster.drop_database(url)


def body(i: int) -> dict[str, Any]:
    return {
        **EXAMPLE_BODY,
        "prompt": f"task {i}",
        "size": SIZES[i % len(SIZES)],
        "quality": ("hd", "standard")[i % 2],
        "n": 1 + i % 3 // 2,  # 1, 1, 2, ...
    }


def assert_images_match_storage(fleet: Fleet, ids: list[str]) -> None:
    """Every task of `ids` has its n images, each once, and storage holds exactly the images
    recorded: those of `ids` and of any task committed whose client got no answer (a submit in
    flight when the API was killed), which its workers ran all the same."""
    with fleet.db.read() as conn:
        every = conn.execute(select(images.c.task_id, images.c.storage_key)).all()
        wanted = dict(conn.execute(select(tasks.c.id, tasks.c.n).where(tasks.c.id.in_(ids))).all())
    rows = [r for r in every if r.task_id in wanted]
    per_task = Counter(r.task_id for r in rows)
    assert per_task == Counter(wanted)
    keys = {r.storage_key for r in every}
    assert len(keys) == len(every)
    on_disk = {
        str(p.relative_to(fleet.storage_dir)) for p in fleet.storage_dir.rglob("*") if p.is_file()
    }
    assert on_disk == keys


def test_four_workers_run_200_tasks_from_five_keys_each_exactly_once(fleet: Fleet) -> None:
    keys = [fleet.key(name=f"k{i}") for i in range(5)]
    for _ in range(4):
        fleet.start_worker()
    api = fleet.start_api()
    submitted: list[tuple[str, str, int]] = []  # (task id, key id, price)
    lock = threading.Lock()

    def client(c: int) -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as http:
            for i in range(c, 200, 4):
                key, secret = keys[i % 5]
                r = http.post("/api/v1/images/generations", json=body(i), headers=auth(secret))
                assert r.status_code == 200, r.text
                with lock:
                    submitted.append((r.json()["data"]["task_id"], key.id, 4 * body(i)["n"]))

    threads = [threading.Thread(target=client, args=(c,)) for c in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [s[0] for s in submitted]
    assert len(set(ids)) == 200
    states = fleet.wait_all_settled(ids)
    assert set(states.values()) == {TaskState.COMPLETED}
    # Each task went through the engine exactly once, and the work was shared.
    per_worker = fleet.calls()
    assert fleet.all_calls() == Counter(ids)
    assert len([c for c in per_worker.values() if c]) >= 2
    with fleet.db.read() as conn:
        assert set(conn.execute(select(tasks.c.attempts).where(tasks.c.id.in_(ids))).scalars()) == {
            1
        }
    assert_images_match_storage(fleet, ids)
    # Credits: each key paid exactly its tasks' price, and its ledger adds up to its balance.
    with fleet.db.read() as conn:
        for key, _ in keys:
            paid = sum(price for _, k, price in submitted if k == key.id)
            balance = key_store.get_key(conn, key.id).balance
            assert balance == 10_000 - paid == key_store.ledger_sum(conn, key.id)


def submit_direct(fleet: Fleet, key: ApiKey, count: int, size: Size = SQUARE) -> list[str]:
    # Like the fleet's own servers: a steady backlog from one key, not a flood to refuse.
    settings = make_settings(
        fleet.workdir,
        fleet.workdir / "cache",
        database_url=fleet.url,
        submit_rate=0.0,
        max_waiting_per_key=10_000,
    )
    req = GenerationRequest(model="cogview-4", prompt="p", size=size, quality="hd", n=1)
    return [generation.submit(fleet.db, settings, key=key, request=req).id for _ in range(count)]


def test_sigkilled_worker_mid_batch_its_tasks_are_reclaimed_and_finished(fleet: Fleet) -> None:
    key, _ = fleet.key()
    ids = submit_direct(fleet, key, 4)
    victim = fleet.start_worker(**{STEP_SECONDS_ENV: "30", "COGVIEW_LEASE_SECONDS": "3"})
    # The victim claimed the four as one batch and its engine is on them.
    fleet.wait_until(
        "claimed by the victim",
        lambda: sum(fleet.calls().get(victim.pid, Counter()).values()) == 4,
    )
    with fleet.db.read() as conn:
        holders = set(conn.execute(select(tasks.c.worker_id).where(tasks.c.id.in_(ids))).scalars())
    assert len(holders) == 1 and set(fleet.states(ids).values()) == {TaskState.RUNNING}
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    rescuer = fleet.start_worker()
    states = fleet.wait_all_settled(ids)
    assert set(states.values()) == {TaskState.COMPLETED}
    calls = fleet.calls()
    assert calls[victim.pid] == Counter(ids) and calls[rescuer.pid] == Counter(ids)
    with fleet.db.read() as conn:
        rows = conn.execute(
            select(tasks.c.attempts, tasks.c.worker_id).where(tasks.c.id.in_(ids))
        ).all()
        assert {r.attempts for r in rows} == {2} and holders.isdisjoint(r.worker_id for r in rows)
        assert key_store.get_key(conn, key.id).balance == 10_000 - 16
    assert_images_match_storage(fleet, ids)


class Submitter:
    """A client submitting back to back in a thread; keeps the ids of every 200 and counts
    the other answers by status (0 = no answer: connection refused or dropped)."""

    def __init__(self, base_url: str, secret: str) -> None:
        self.base_url = base_url
        self.secret = secret
        self.accepted: list[str] = []
        self.refused: Counter[int] = Counter()
        self.retry_after: set[str | None] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Submitter:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)

    def _run(self) -> None:
        i = 0
        with httpx.Client(base_url=self.base_url, timeout=10) as http:
            while not self.stop.is_set():
                i += 1
                try:
                    r = http.post(
                        "/api/v1/images/generations", json=body(i), headers=auth(self.secret)
                    )
                except httpx.TransportError:
                    self.refused[0] += 1
                    time.sleep(0.05)
                    continue
                if r.status_code == 200:
                    self.accepted.append(r.json()["data"]["task_id"])
                else:
                    self.refused[r.status_code] += 1
                    self.retry_after.add(r.headers.get("Retry-After"))
                    time.sleep(0.05)
                time.sleep(0.02)

    def wait_accepted(self, more: int, timeout: float = 60) -> None:
        target = len(self.accepted) + more
        deadline = time.monotonic() + timeout
        while len(self.accepted) < target:
            assert time.monotonic() < deadline, f"only {len(self.accepted)} accepted"
            time.sleep(0.05)


def test_api_restart_under_load_loses_no_accepted_task(fleet: Fleet) -> None:
    key, secret = fleet.key(credits=1_000_000)
    fleet.start_worker()
    fleet.start_worker()
    api = fleet.start_api()
    with Submitter(api.base_url, secret) as load:
        load.wait_accepted(20)
        api.kill()  # SIGKILL: requests in flight get no answer; none that got a 200 may vanish
        api.start(wait_ready=False)
        load.wait_accepted(20)
    assert load.refused[0] >= 1  # the client did see the API down
    states = fleet.wait_all_settled(load.accepted)
    assert len(states) == len(set(load.accepted)) and set(states.values()) == {TaskState.COMPLETED}
    with httpx.Client(base_url=api.base_url) as http:
        for task_id in load.accepted[:: max(1, len(load.accepted) // 10)]:
            r = http.get(f"/api/v1/tasks/{task_id}", headers=auth(secret))
            assert r.json()["data"]["status"] == "COMPLETED"
    assert_images_match_storage(fleet, load.accepted)


def test_postgres_restart_under_load_503_then_everyone_reconnects(
    fleet: Fleet, pg_cluster: pg.PgCluster
) -> None:
    # A task whose completing write met the outage runs again once its (short) lease lapses;
    # enough attempts that a slow machine cannot turn that into a failure.
    fleet.env.update(COGVIEW_LEASE_SECONDS="3", COGVIEW_MAX_ATTEMPTS="10")
    key, secret = fleet.key(credits=1_000_000)
    fleet.start_worker()
    fleet.start_worker()
    api = fleet.start_api()
    with Submitter(api.base_url, secret) as load:
        load.wait_accepted(20)
        pg_cluster.stop_server("fast")
        try:
            r = httpx.post(
                api.base_url + "/api/v1/images/generations", json=body(0), headers=auth(secret)
            )
            assert r.status_code == 503, r.text
            assert r.json()["error"]["type"] == "service_unavailable"
            assert r.json()["error"]["code"] == 503 and int(r.headers["Retry-After"]) >= 1
            time.sleep(1.0)  # workers and the listener find the database gone
        finally:
            pg_cluster.start_server()
        load.wait_accepted(20)  # the API's pool reconnected by itself
    assert load.refused[503] >= 1 and set(load.refused) <= {503}
    assert load.retry_after - {None} and None not in load.retry_after
    # The workers reconnected by themselves: tasks accepted after the restart complete too.
    states = fleet.wait_all_settled(load.accepted)
    assert set(states.values()) == {TaskState.COMPLETED}
    assert_images_match_storage(fleet, load.accepted)
    with fleet.db.read() as conn:
        assert key_store.get_key(conn, key.id).balance == key_store.ledger_sum(conn, key.id)


def test_a_light_key_starts_within_one_batch_of_a_heavy_backlog(fleet: Fleet) -> None:
    heavy, _ = fleet.key(name="heavy")
    light, _ = fleet.key(name="light")
    backlog = submit_direct(fleet, heavy, 100)
    fleet.start_worker(**{STEP_SECONDS_ENV: "0.2"})
    fleet.wait_until(
        "the first batch started", lambda: TaskState.RUNNING in fleet.states(backlog).values()
    )
    (late,) = submit_direct(fleet, light, 1, Size(768, 1344))
    fleet.wait_until("the light task done", lambda: fleet.states([late])[late] in TERMINAL)
    with fleet.db.read() as conn:
        started = task_store.get_task(conn, late).started_at
        before = conn.execute(
            select(func.count()).where(tasks.c.key_id == heavy.id, tasks.c.started_at < started)
        ).scalar_one()
    assert 1 <= before <= 4  # one batch (max_batch_size 4) of the heavy key, not the hundred


def listening(cluster: pg.PgCluster, url: str) -> bool:
    """Whether some session on that database is LISTENing (its last statement was LISTEN)."""
    import psycopg

    with psycopg.connect(cluster.admin_dsn, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND query LIKE 'LISTEN %%'",
            (url.rsplit("/", 1)[1],),
        ).fetchone()
    return bool(row and row[0])


def test_notify_wakes_an_idle_worker_and_the_listener_reconnects(
    fleet: Fleet, pg_cluster: pg.PgCluster
) -> None:
    """With the poll fallback at 10 minutes, only NOTIFY can start these tasks in time; after
    its connection is killed, the listener reconnects by itself and wakes the worker again."""
    key, _ = fleet.key()
    fleet.start_worker(COGVIEW_POLL_INTERVAL="600")
    fleet.wait_until("listening", lambda: listening(pg_cluster, fleet.url))
    time.sleep(0.5)  # the worker has looked at the empty queue and sleeps until woken
    (first,) = submit_direct(fleet, key, 1)
    fleet.wait_until("first done", lambda: fleet.states([first])[first] in TERMINAL, timeout=30)
    assert pg_cluster.terminate_backends(fleet.url) >= 1
    fleet.wait_until("listening again", lambda: listening(pg_cluster, fleet.url))
    time.sleep(0.5)
    (second,) = submit_direct(fleet, key, 1)
    fleet.wait_until("second done", lambda: fleet.states([second])[second] in TERMINAL, timeout=30)
    assert fleet.states([first, second]) == {
        first: TaskState.COMPLETED,
        second: TaskState.COMPLETED,
    }
