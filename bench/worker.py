"""The worker's cost beside its engine (issue 14), this tree against `--baseline`, in one run.

Each side runs in its own child process with its own `src` on PYTHONPATH (the baseline is
exported with `git archive`, as bench/request_cost.py does), against a fresh database: a SQLite
file, or a database of a throwaway PostgreSQL cluster (tests/pg.py), with images in S3 (a moto
server, a real HTTP endpoint on loopback). The worker runs in the child as `cogview-api worker`
runs it (`WorkerThread`), with the tiny CogView4 model wrapped to note when each
`Engine.generate` call starts and returns. Three figures:

  idle:   engine idle time between batches = next generate's start - previous generate's end,
          p50/p99, with a backlog of `--tasks` tasks at 1024x1024, n=4, steps=1, batch size 1
          (so encoding four PNGs and uploading them weigh as they would beside a fast GPU).
  writes: database write transactions (every `Database.write` of the child: claims, progress,
          settling, housekeeping, lease renewals) per task, 8 tasks at 512x512, 50 steps,
          batch of 4.
  claim:  with 50 API keys with 2 tasks each waiting, one claim of 4 and the reads that give the
          worker its tasks (the baseline read each claimed task back): statements executed and
          wall time, median of `--claims` claims (each put back before the next).

    .venv/bin/python bench/worker.py --out bench/results/worker-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from request_cost import export_tree  # noqa: E402  (the same `git archive` of a ref's src)

ROOT = Path(__file__).resolve().parent.parent
BASELINE = "202933a"  # main when issue 14's work began
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=12, help="backlog for the idle figure")
    p.add_argument("--claims", type=int, default=20, help="claims timed")
    p.add_argument("--baseline", default=BASELINE, help="git ref to compare with")
    p.add_argument("--backends", default="sqlite,postgresql")
    p.add_argument("--out", type=Path)
    p.add_argument("--child", help=argparse.SUPPRESS)  # JSON: one side's run
    return p.parse_args()


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered) + 0.5) - 1))]
    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(p99 * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
    }


# -- the child: one tree, one backend ------------------------------------------------------


def child(spec: dict[str, Any]) -> dict[str, Any]:
    from cogview_api.config import Settings
    from cogview_api.engine import load_engine

    base = dict(
        database_url=spec["database_url"],
        storage_url=spec["storage_url"],
        s3_endpoint_url=spec["s3_endpoint_url"],
        cache_dir=spec["cache_dir"],
        model="tiny",
        batch_timeout=0.0,
        poll_interval=0.05,
        submit_rate=0.0,
        max_queue=100_000,
    )
    settings = Settings(**base, steps_hd=1, max_batch_size=1)  # type: ignore[arg-type]
    engine = load_engine(settings)
    out: dict[str, Any] = {}
    out["idle"] = run_backlog(settings, engine, spec["tasks"], size=(1024, 1024), n=4)
    settings = Settings(**base, steps_hd=50, max_batch_size=4)  # type: ignore[arg-type]
    out["writes"] = run_backlog(settings, engine, 8, size=(512, 512), n=1)
    out["claim"] = claims(settings, spec["claims"])
    return out


class TimedEngine:
    def __init__(self, inner: Any) -> None:
        self.inner, self.name, self.device = inner, inner.name, inner.device
        self.calls: list[tuple[float, float]] = []

    def generate(self, jobs: Any, progress: Any) -> Any:
        start = time.perf_counter()
        try:
            return self.inner.generate(jobs, progress)
        finally:
            self.calls.append((start, time.perf_counter()))


@contextmanager
def counted_writes(db: Any) -> Iterator[list[int]]:
    count = [0]
    write = db.write
    lock = threading.Lock()

    @contextmanager
    def counting() -> Iterator[Any]:
        with lock:
            count[0] += 1
        with write() as conn:
            yield conn

    db.write = counting
    try:
        yield count
    finally:
        db.write = write


def run_backlog(
    settings: Any, engine: Any, n_tasks: int, *, size: tuple[int, int], n: int
) -> dict[str, Any]:
    from cogview_api.domain import GenerationRequest, Size, TaskState
    from cogview_api.services import generation
    from cogview_api.services import keys as key_service
    from cogview_api.storage import open_storage
    from cogview_api.store import tasks as task_store
    from cogview_api.store.db import Database
    from cogview_api.worker.loop import Worker
    from cogview_api.worker.supervisor import WorkerThread, stop_workers

    db = Database(settings.database_url)
    db.migrate()
    key, _ = key_service.create_key(db, name=secrets.token_hex(4), credits=10**9)
    request = GenerationRequest(
        model="cogview-4", prompt="a lighthouse at dusk", size=Size(*size), quality="hd", n=n
    )
    ids = [generation.submit(db, settings, key=key, request=request).id for _ in range(n_tasks)]
    timed = TimedEngine(engine)
    storage = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    worker = Worker(settings=settings, db=db, storage=storage, engine=timed)
    started = time.perf_counter()
    with counted_writes(db) as writes:
        thread = WorkerThread(worker).start()
        while True:
            with db.read() as conn:
                states = [task_store.get_task(conn, i).state for i in ids]
            if all(s.terminal for s in states):
                break
            time.sleep(0.02)
        stop_workers([thread], grace=60)
    wall = time.perf_counter() - started
    gaps = [b[0] - a[1] for a, b in zip(timed.calls, timed.calls[1:], strict=False)]
    db.dispose()
    return {
        "tasks": n_tasks,
        "batches": len(timed.calls),
        "completed": sum(s is TaskState.COMPLETED for s in states),
        "engine_s": round(sum(b - a for a, b in timed.calls), 3),
        "wall_s": round(wall, 3),
        "engine_idle_between_batches": percentiles(gaps),
        "writes": writes[0],
        "writes_per_task": round(writes[0] / n_tasks, 1),
    }


def claims(settings: Any, repeats: int) -> dict[str, Any]:
    from sqlalchemy import event, update

    from cogview_api.domain import GenerationRequest, Size, Stage, TaskState
    from cogview_api.services import generation
    from cogview_api.services import keys as key_service
    from cogview_api.store import queue
    from cogview_api.store import tasks as task_store
    from cogview_api.store.db import Database
    from cogview_api.store.tables import tasks

    db = Database(settings.database_url)
    db.migrate()
    request = GenerationRequest(
        model="cogview-4", prompt="a cat", size=Size(1024, 1024), quality="hd", n=1
    )
    for k in range(50):
        key, _ = key_service.create_key(db, name=f"claim-{k}", credits=10**6)
        for _ in range(2):
            generation.submit(db, settings, key=key, request=request)
    statements = [0]

    def count(*_: Any) -> None:
        statements[0] += 1

    new = hasattr(queue, "claim_tasks")
    times, counts = [], []
    for _ in range(repeats):
        statements[0] = 0
        event.listen(db.engine, "before_cursor_execute", count)
        start = time.perf_counter()
        with db.write() as conn:
            if new:
                got = [
                    t.id for t in queue.claim_tasks(conn, worker_id="w", limit=4, lease_seconds=60)
                ]
            else:
                got = queue.claim_batch(conn, worker_id="w", limit=4, lease_seconds=60)
        if not new:  # the baseline worker read each claimed task back (Worker._load)
            with db.read() as conn:
                [task_store.get_task(conn, i) for i in got]
        times.append(time.perf_counter() - start)
        event.remove(db.engine, "before_cursor_execute", count)
        counts.append(statements[0])
        assert len(got) == 4
        with db.write() as conn:
            conn.execute(
                update(tasks)
                .where(tasks.c.id.in_(got))
                .values(
                    state=TaskState.QUEUED,
                    stage=Stage.QUEUED,
                    worker_id=None,
                    lease_expires_at=None,
                    started_at=None,
                )
            )
    db.dispose()
    return {
        "keys_waiting": 50,
        "statements": statistics.median(counts),
        "time": percentiles(times),
    }


# -- the parent ----------------------------------------------------------------------------


@contextmanager
def moto_server() -> Iterator[str]:
    sys.path.insert(0, str(ROOT))
    from tests.support import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        import httpx

        for _ in range(600):
            try:
                httpx.get(endpoint + "/moto-api/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def new_bucket(endpoint: str) -> str:
    import boto3

    name = "bench-" + secrets.token_hex(6)
    boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1"
    ).client("s3", endpoint_url=endpoint).create_bucket(Bucket=name)
    return name


def main() -> None:
    args = parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    os.environ.update(AWS_ENV)
    sys.path.insert(0, str(ROOT))
    from tests import pg

    from api_overhead import code_version, cpu_audit, emit  # type: ignore[import-not-found]

    backends = args.backends.split(",")
    cluster = None
    if "postgresql" in backends:
        bindir = pg.find_bindir()
        if bindir is None:
            raise SystemExit(pg.missing_message())
        cluster = pg.start_cluster(bindir)
    result: dict[str, Any] = {
        "bench": "worker",
        "code": code_version(),
        "baseline": args.baseline,
        "runs": {},
    }
    with tempfile.TemporaryDirectory() as tmp, moto_server() as endpoint, cpu_audit() as audit:
        trees = {"before": export_tree(args.baseline, Path(tmp)), "after": ROOT / "src"}
        cache = Path(tmp) / "cache"
        try:
            for backend in backends:
                for side, src in trees.items():
                    if backend == "sqlite":
                        url = f"sqlite:///{tmp}/{side}-{secrets.token_hex(3)}.db"
                    else:
                        assert cluster is not None
                        url = cluster.create_database()
                    spec = {
                        "database_url": url,
                        "storage_url": f"s3://{new_bucket(endpoint)}/img",
                        "s3_endpoint_url": endpoint,
                        "cache_dir": str(cache),
                        "tasks": args.tasks,
                        "claims": args.claims,
                    }
                    env = {**os.environ, "PYTHONPATH": str(src), "COGVIEW_LOG_LEVEL": "warning"}
                    out = subprocess.run(
                        [sys.executable, __file__, "--child", json.dumps(spec)],
                        env=env,
                        check=True,
                        capture_output=True,
                        text=True,
                    ).stdout
                    run = json.loads(out.strip().splitlines()[-1])
                    result["runs"][f"{backend}/{side}"] = run
                    print(backend, side, json.dumps(run), file=sys.stderr)
        finally:
            if cluster is not None:
                cluster.stop()
    result["cpu_audit"] = audit
    emit(result, args.out)


if __name__ == "__main__":
    main()
