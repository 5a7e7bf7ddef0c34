"""What a queue position costs on PostgreSQL: this tree against a previous design
(`--baseline`, a git ref exported with `git archive`), on one database, in one run.

A throwaway PostgreSQL cluster (tests/pg.py; Debian's server binaries) gets one queue written
with COPY, then VACUUM ANALYZE: one key's `--backlog` tasks, then `--keys` keys with one task
each (one shape, nothing running). For a few tasks (the first, the backlog's 6th, the first
and the last light key's), each design's `store.positions.queue_positions` is timed in its own
process (the median of `--repeat` calls, wall time in this process: the database's work is in
another process), the designs taking turns for `--rounds` rounds. Reports each design's answer
and median ms per task.

    .venv/bin/python bench/positions_pg.py --out bench/results/positions_pg.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(Path(__file__).resolve().parent))

from request_cost import export_tree  # noqa: E402


def child(url: str, ids: list[str], repeat: int) -> dict[str, Any]:
    from cogview_api.domain import BatchKey, PriorityClass
    from cogview_api.store import positions
    from cogview_api.store.db import Database
    from cogview_api.store.tables import tasks

    db = Database(url)
    out: dict[str, Any] = {}
    with db.read() as conn:
        for task_id in ids:
            row = conn.execute(tasks.select().where(tasks.c.id == task_id)).one()
            shape = BatchKey(row.width, row.height, row.steps, row.guidance_scale)
            target = positions.Waiting(
                row.id, row.key_id, row.seq, shape, PriorityClass(row.priority)
            )
            costs = []
            for _ in range(repeat):
                start = time.perf_counter()
                got = positions.queue_positions(conn, [target], batch_size=1)
                costs.append(time.perf_counter() - start)
            out[task_id] = {"position": got[task_id], "ms": statistics.median(costs) * 1000}
    db.dispose()
    return out


def load(url: str, backlog: int, keys: int) -> list[str]:
    """The queue, written with COPY; returns the ids of the tasks to time."""
    import psycopg

    plan = ["A"] * backlog + [f"k{i}" for i in range(keys)]
    with psycopg.connect(url, autocommit=True) as con:
        con.execute("SET session_replication_role = replica")  # no key rows needed (FK)
        copy = (
            "COPY tasks (id, key_id, state, stage, width, height, steps, guidance_scale, model, "
            "prompt, negative_prompt, quality, n, seeds, seed_given, output_format, step, "
            "attempts, max_attempts, credits_charged, credits_refunded, created_at) FROM STDIN"
        )
        with con.cursor().copy(copy) as rows:
            for i, key in enumerate(plan):
                rows.write_row(
                    (f"t{i:07d}", key, "queued", "queued", 1024, 1024, 28, 5.0, "cogview-4")
                    + ("p", "", "hd", 1, "[1]", False, "png", 0, 0, 3, 1, 0)
                    + ("2026-01-01 00:00:00+00",)
                )
        # The triggers were off for COPY: count the queue as they would have.
        con.execute(
            "UPDATE queue_depth SET waiting = (SELECT count(*) FROM tasks WHERE state = "
            "'queued' AND seq % (SELECT count(*) FROM queue_depth) = queue_depth.stripe)"
        )
        con.execute("VACUUM ANALYZE tasks")
    return [f"t{i:07d}" for i in (0, 5, backlog, backlog + keys - 1)]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default="0dca75e", help="git ref of the previous design")
    p.add_argument("--backlog", type=int, default=100_000)
    p.add_argument("--keys", type=int, default=40)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--child", nargs=2, metavar=("URL", "IDS"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1].split(","), args.repeat)))
        return 0
    from tests.pg import find_bindir, start_cluster

    bindir = find_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found (Debian: postgresql)")
    cluster = start_cluster(bindir)
    runs: dict[str, list[dict[str, Any]]] = {"this": [], "baseline": []}
    try:
        url = cluster.create_database(migrated=True)
        ids = load(url, args.backlog, args.keys)
        sa_url = url.replace("postgresql://", "postgresql+psycopg://")
        with tempfile.TemporaryDirectory() as tmp:
            srcs = {"this": ROOT / "src", "baseline": export_tree(args.baseline, Path(tmp))}
            for _ in range(args.rounds):
                for name, src in srcs.items():
                    done = subprocess.run(
                        [sys.executable, __file__, "--repeat", str(args.repeat), "--child"]
                        + [sa_url, ",".join(ids)],
                        env={**os.environ, "PYTHONPATH": str(src)},
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs[name].append(json.loads(done.stdout))
    finally:
        cluster.stop()
    result: dict[str, Any] = {
        "bench": "positions_pg",
        "baseline": args.baseline,
        "queue": f"one key's {args.backlog} tasks, then {args.keys} keys with one each",
        "load_average": os.getloadavg(),
        "tasks": {
            i: {
                name: {
                    "position": rounds[0][i]["position"],
                    "ms_median": round(statistics.median(r[i]["ms"] for r in rounds), 3),
                }
                for name, rounds in runs.items()
            }
            for i in ids
        },
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
