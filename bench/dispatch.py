"""Dispatch overhead of the queue: how long a worker with work waiting takes from one batch
finishing to the next starting, and how long a task waits for an idle worker.

One `cogview-api worker --model tiny` process (steps 1: the tiny model's smallest step count)
against a fresh database: a SQLite file, or a throwaway PostgreSQL cluster (tests/pg.py: initdb +
pg_ctl in a temp folder, loopback only). Tasks are submitted by this process through the service
layer (the same transaction as an API submit, NOTIFY included), so no HTTP server competes for
the two cores. Everything is read back from the task rows' own timestamps:

  backlog: N tasks queued before the worker starts. The worker claims batch after batch; a batch
           is the tasks claimed together (same started_at). gap = next batch's started_at - the
           latest completed_at of the batch before (its last task settled: images stored, row
           written). It covers the worker's loop between batches: heartbeat, lease reclaim,
           the claim transaction, reading the tasks back. p50/p99 over the N/B - 1 gaps.
  idle:    R times: submit one task once the worker is idle (50 ms after the previous task was
           seen completed), wait for it; queue wait = started_at - created_at. With PostgreSQL
           LISTEN/NOTIFY the worker wakes on the submit's commit; without (COGVIEW_LISTEN=false,
           or SQLite, where a separate process has nothing to wake it) it looks every
           COGVIEW_POLL_INTERVAL (0.5 s, the default).

    .venv/bin/python bench/dispatch.py --out bench/results/dispatch-cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from api_overhead import code_version, cpu_audit, emit, machine_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/pg.py starts the throwaway cluster

from sqlalchemy import select  # noqa: E402
from tests import pg  # noqa: E402

from cogview_api.config import Settings  # noqa: E402
from cogview_api.domain import GenerationRequest, Size, TaskState  # noqa: E402
from cogview_api.services import generation  # noqa: E402
from cogview_api.services import keys as key_service  # noqa: E402
from cogview_api.store.db import Database  # noqa: E402
from cogview_api.store.tables import tasks, workers  # noqa: E402

TERMINAL = (TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=30, help="backlog tasks (default 30)")
    p.add_argument("--batch-size", type=int, default=1, help="COGVIEW_MAX_BATCH_SIZE (default 1)")
    p.add_argument("--idle-runs", type=int, default=10, help="idle submits (default 10)")
    p.add_argument("--steps", type=int, default=1, help="COGVIEW_STEPS_HD (default 1)")
    p.add_argument("--size", default="1024*1024")
    p.add_argument("--poll", type=float, default=0.5, help="COGVIEW_POLL_INTERVAL (default 0.5)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    return p.parse_args()


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def pct(q: float) -> float:  # nearest rank
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]

    return {
        "n": len(values),
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "p99_ms": round(pct(0.99) * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "mean_ms": round(statistics.fmean(values) * 1000, 1),
    }


@contextmanager
def worker_process(
    url: str, folder: Path, args: argparse.Namespace, listen: bool
) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
    env.update(
        COGVIEW_DATABASE_URL=url,
        COGVIEW_STORAGE_URL=f"file://{folder}/images",
        COGVIEW_CACHE_DIR=str(args.cache_dir),
        COGVIEW_STEPS_HD=str(args.steps),
        COGVIEW_POLL_INTERVAL=str(args.poll),
        COGVIEW_MAX_BATCH_SIZE=str(args.batch_size),
        COGVIEW_BATCH_TIMEOUT="0",
        COGVIEW_LISTEN="true" if listen else "false",
        COGVIEW_LOG_LEVEL="warning",
        HF_HUB_OFFLINE="1",
    )
    log = open(folder / f"worker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "cogview_api.cli", "worker", "--model", "tiny"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def submitter(db: Database, settings: Settings, size: Size) -> Any:
    key, _ = key_service.create_key(db, name="bench", credits=10_000_000)
    request = GenerationRequest(model="cogview-4", prompt="a cat", size=size, quality="hd", n=1)

    def submit() -> str:
        return generation.submit(db, settings, key=key, request=request).id

    return submit


def rows(db: Database, ids: list[str]) -> list[Any]:
    with db.read() as conn:
        return list(
            conn.execute(
                select(
                    tasks.c.id,
                    tasks.c.state,
                    tasks.c.created_at,
                    tasks.c.started_at,
                    tasks.c.completed_at,
                ).where(tasks.c.id.in_(ids))
            )
        )


def wait_settled(
    db: Database, ids: list[str], proc: subprocess.Popen[bytes], timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = rows(db, ids)
        if all(TaskState(r.state) in TERMINAL for r in got):
            bad = [r.id for r in got if TaskState(r.state) is not TaskState.COMPLETED]
            if bad:
                raise RuntimeError(f"tasks did not complete: {bad}")
            return
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError("tasks not done in time")
        time.sleep(0.005)


def wait_worker_ready(db: Database, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 300
    while True:
        with db.read() as conn:
            if conn.execute(select(workers.c.id)).first() is not None:
                return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("worker did not start")
        time.sleep(0.05)


def backlog_gaps(db: Database, ids: list[str]) -> dict[str, Any]:
    batches: dict[datetime, list[Any]] = {}
    for r in rows(db, ids):
        batches.setdefault(r.started_at, []).append(r)
    ordered = [batches[k] for k in sorted(batches)]
    gaps = [
        (nxt[0].started_at - max(r.completed_at for r in prev)).total_seconds()
        for prev, nxt in zip(ordered, ordered[1:], strict=False)
    ]
    busy = [(max(r.completed_at for r in b) - b[0].started_at).total_seconds() for b in ordered[1:]]
    return {
        "batches": len(ordered),
        "batch_sizes": sorted({len(b) for b in ordered}),
        "gap_between_batches": percentiles(gaps),
        "batch_claimed_to_settled": percentiles(busy),
        "gaps_ms": [round(g * 1000, 1) for g in gaps],
    }


def idle_waits(
    db: Database, submit: Any, proc: subprocess.Popen[bytes], runs: int
) -> dict[str, Any]:
    waits = []
    for i in range(runs + 1):  # the first one warms up
        time.sleep(0.05)  # the worker has looked at the empty queue and sleeps
        task_id = submit()
        wait_settled(db, [task_id], proc, timeout=120)
        (r,) = rows(db, [task_id])
        if i:
            waits.append((r.started_at - r.created_at).total_seconds())
    return {"queue_wait": percentiles(waits), "waits_ms": [round(w * 1000, 1) for w in waits]}


def run_config(
    url: str, args: argparse.Namespace, *, listen: bool, backlog: bool
) -> dict[str, Any]:
    width, height = (int(v) for v in args.size.split("*"))
    with tempfile.TemporaryDirectory(prefix="cogview-dispatch-") as tmp:
        folder = Path(tmp)
        if url.startswith("sqlite"):
            url = f"sqlite:///{folder}/cogview.db"
        db = Database(url)
        db.migrate()
        settings = Settings(
            database_url=url, steps_hd=args.steps, max_queue=100_000, cache_dir=args.cache_dir
        )
        submit = submitter(db, settings, Size(width, height))
        out: dict[str, Any] = {"listen": listen and db.dialect == "postgresql"}
        try:
            ids = [submit() for _ in range(args.tasks)] if backlog else []
            with cpu_audit() as audit, worker_process(url, folder, args, listen) as proc:
                wait_worker_ready(db, proc)
                if ids:
                    wait_settled(db, ids, proc, timeout=60 + 30 * args.tasks)
                    out["backlog"] = backlog_gaps(db, ids)
                out["idle"] = idle_waits(db, submit, proc, args.idle_runs)
            out["cpu_audit"] = audit
        finally:
            db.dispose()
        return out


def main() -> int:
    args = parse_args()
    result: dict[str, Any] = {
        "benchmark": "dispatch",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(),
        "config": {
            "tasks": args.tasks,
            "batch_size": args.batch_size,
            "idle_runs": args.idle_runs,
            "steps": args.steps,
            "size": args.size,
            "poll_interval_s": args.poll,
            "model": "tiny",
            "submit": "in this process via services.generation.submit (no HTTP)",
        },
        "notes": [line for line in __doc__.split("\n\n")[1:3]],
    }
    result["sqlite"] = run_config("sqlite://", args, listen=False, backlog=True)
    bindir = pg.find_bindir()
    if bindir is None:
        result["postgresql"] = pg.missing_message()
    else:
        cluster = pg.start_cluster(bindir)
        try:
            result["postgresql"] = run_config(
                cluster.create_database(), args, listen=True, backlog=True
            )
            result["postgresql_listen_off"] = run_config(
                cluster.create_database(), args, listen=False, backlog=False
            )
        finally:
            cluster.stop()
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
