"""A quick A/B of API CPU per request: this tree against one git ref, a few endpoints.

`request_cost.py`'s servers and measurement (both `serve --workers 0 --model test-echo` on
SQLite, pinned to core 0, wrk pinned to core 1, interleaved per endpoint and round), without its
backlog and throughput phases: for checking one change in a minute or two.

    .venv/bin/python bench/request_ab.py HEAD~1 healthz,submit --rounds 5

Endpoints: healthz, poll_completed, account, poll_queued_newest, submit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_cost as rc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="git ref of the design to compare against")
    p.add_argument("endpoints", nargs="?", default="healthz,poll_completed,account,submit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--port", type=int, default=18401, help="the base's port; this tree's is +1")
    p.add_argument(
        "--submit-keys", type=int, default=400, help="keys the submits rotate over (one a request)"
    )
    args = p.parse_args()
    endpoints = args.endpoints.split(",")
    rc.LOGS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "base").mkdir()
        (t / "this").mkdir()
        servers = [
            rc.Server("base", rc.export_tree(args.ref, t / "base"), t / "base", args.port),
            rc.Server("this", rc.ROOT / "src", t / "this", args.port + 1),
        ]
        seeds = {s.name: rc.seed(s) for s in servers}
        # As request_cost.py: submits rotate over keys of their own, the backlog is another's.
        submit_keys = {
            s.name: rc.clone_keys(s.db_path, seeds[s.name]["secret"], args.submit_keys + 1)[1:]
            for s in servers
        }
        queued = {s.name: rc.grow_backlog(s.db_path, 100) for s in servers}
        try:
            for s in servers:
                s.start(workers=0, cpu="0")
            out = rc.cost_rounds(servers, seeds, queued, args, endpoints, submit_keys)
        finally:
            for s in servers:
                s.stop()
    for e in endpoints:
        base, this = out["base"][e], out["this"][e]
        print(
            f"{e:20s} {args.ref} {base['api_cpu_ms_median']:.3f} ms {base['api_cpu_ms_runs']}"
            f"  this {this['api_cpu_ms_median']:.3f} ms {this['api_cpu_ms_runs']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
