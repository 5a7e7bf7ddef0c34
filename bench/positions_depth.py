"""How deep queue positions are exact, and what a position costs: this tree against a previous
design (`--baseline`, a git ref exported with `git archive`), in one run.

Each scenario is a queue of waiting tasks written straight into a fresh SQLite database (one
shape, nothing running, batch size 1): `keys400` (one key's 100 tasks, then 400 keys with one
each), `flood` (one key's 5,000, then 50 keys with one each), `mixed` (600 tasks, half of them
one key's, the rest 60 keys at random), `spread` (600 tasks of 200 keys at random). For every
waiting task, each design's `store.positions.queue_positions` is timed in its own process (the
best of 3 calls, CPU of this process: no HTTP), and its answer compared with the true position:
this tree's replay with its read limits lifted. Reported per design and scenario: the deepest
position up to which every task got its true position, how many tasks got it, and the median
and largest cost per read near the front (true position <= 10), further in, and overall.

    .venv/bin/python bench/positions_depth.py --out bench/results/positions_depth.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from request_cost import export_tree  # the same git-archive export of a previous tree

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("keys400", "flood", "mixed", "spread")


def plan(name: str) -> list[str]:
    """The key of each waiting task, oldest first."""
    rng = random.Random(7)
    if name == "keys400":
        return ["B"] * 100 + [f"k{i}" for i in range(400)]
    if name == "flood":
        return ["A"] * 5000 + [f"l{i}" for i in range(50)]
    if name == "mixed":
        return [rng.choice(["A"] * 5 + [f"k{rng.randint(0, 60)}"]) for _ in range(600)]
    return [f"k{rng.randint(0, 200)}" for _ in range(600)]


def child(scenario: str, truth: bool) -> dict[str, Any]:
    """In a process whose `cogview_api` is the design under test: every task's position and
    cost (or the true positions, limits lifted)."""
    from cogview_api.domain import BatchKey, PriorityClass
    from cogview_api.store import positions
    from cogview_api.store.db import Database
    from cogview_api.store.tables import tasks

    keys = plan(scenario)
    path = Path(tempfile.mkdtemp()) / "q.db"
    db = Database(f"sqlite:///{path}")
    db.migrate()
    con = sqlite3.connect(path)  # foreign keys off: the tasks' keys need no api_keys rows
    con.executemany(
        "INSERT INTO tasks (id, key_id, state, stage, width, height, steps, guidance_scale, "
        "model, prompt, negative_prompt, quality, n, seeds, seed_given, output_format, step, "
        "attempts, max_attempts, credits_charged, credits_refunded, created_at) VALUES "
        "(?, ?, 'queued', 'queued', 1024, 1024, 28, 5.0, 'cogview-4', 'p', '', 'hd', 1, '[1]', "
        "0, 'png', 0, 0, 3, 1, 0, '2026-01-01 00:00:00')",
        [(f"t{i:07d}", k) for i, k in enumerate(keys)],
    )
    con.commit()
    con.close()
    if truth:
        for name in ("READ_CAP", "STATEMENT_CAP", "OLDER_CAP"):
            setattr(positions, name, 10**9)
    out: dict[str, Any] = {"positions": {}, "ms": {}}
    with db.read() as conn:
        for row in conn.execute(tasks.select().order_by(tasks.c.seq)).all():
            shape = BatchKey(row.width, row.height, row.steps, row.guidance_scale)
            target = positions.Waiting(
                row.id, row.key_id, row.seq, shape, PriorityClass(row.priority)
            )
            costs = []
            for _ in range(1 if truth else 3):
                start = time.process_time()
                got = positions.queue_positions(conn, [target], batch_size=1)
                costs.append(time.process_time() - start)
            out["positions"][row.id] = got[row.id]
            out["ms"][row.id] = round(min(costs) * 1000, 4)
    db.dispose()
    return out


def run_child(src: Path, scenario: str, truth: bool = False) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src)}
    args = [sys.executable, __file__, "--child", scenario] + (["--truth"] if truth else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout))


def summary(truth: dict[str, int], got: dict[str, Any]) -> dict[str, Any]:
    wrong = sorted(truth[i] for i in truth if got["positions"][i] != truth[i])
    exact_to = wrong[0] - 1 if wrong else max(truth.values())

    def ms(ids: list[str]) -> dict[str, float] | None:
        costs = [got["ms"][i] for i in ids]
        if not costs:
            return None
        return {"median": round(statistics.median(costs), 3), "max": round(max(costs), 3)}

    return {
        "exact_up_to_position": exact_to,
        "exact_tasks": len(truth) - len(wrong),
        "tasks": len(truth),
        "ms_near_front": ms([i for i in truth if truth[i] <= 10]),
        "ms_further": ms([i for i in truth if truth[i] > 10]),
        "ms_all": ms(list(truth)),
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--baseline", default="0dca75e", help="git ref of the previous design")
    p.add_argument("--scenarios", nargs="*", default=list(SCENARIOS), choices=SCENARIOS)
    p.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    p.add_argument("--truth", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.truth)))
        return 0
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "bench": "positions_depth",
        "this": head,
        "baseline": args.baseline,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "load_average_at_start": os.getloadavg(),
        "scenarios": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        base_src = export_tree(args.baseline, Path(tmp))
        for name in args.scenarios:
            truth = run_child(ROOT / "src", name, truth=True)["positions"]
            this = run_child(ROOT / "src", name)
            base = run_child(base_src, name)
            result["scenarios"][name] = {
                "this": summary(truth, this),
                "baseline": summary(truth, base),
            }
            print(name, json.dumps(result["scenarios"][name]), file=sys.stderr)
    result["load_average_at_end"] = os.getloadavg()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
