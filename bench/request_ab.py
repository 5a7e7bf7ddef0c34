"""A quick A/B of API CPU per request: this tree against one git ref, a few endpoints.

`request_cost.py`'s servers and measurement (both `serve --workers 0 --model test-echo` on
SQLite, pinned to core 0, wrk pinned to core 1, interleaved per endpoint and round), without its
backlog and throughput phases: for checking one change in a minute or two.

    .venv/bin/python bench/request_ab.py HEAD~1 healthz,submit --rounds 5

With `--metrics-off-vs-on` both servers run this tree, the first with COGVIEW_METRICS=false
(no /metrics, no HTTP instrumentation) and the second with the default, metrics on:

    .venv/bin/python bench/request_ab.py --metrics-off-vs-on poll_completed,healthz \\
        --rounds 7 --out bench/results/request_ab-metrics.json

Endpoints: healthz, poll_completed, account, poll_queued_newest, submit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_cost as rc  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", nargs="?", help="git ref of the design to compare against")
    p.add_argument("endpoints", nargs="?", default="healthz,poll_completed,account,submit")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3)
    p.add_argument("--port", type=int, default=18401, help="the base's port; this tree's is +1")
    p.add_argument(
        "--submit-keys", type=int, default=400, help="keys the submits rotate over (one a request)"
    )
    p.add_argument(
        "--metrics-off-vs-on",
        action="store_true",
        help="this tree twice: COGVIEW_METRICS=false against metrics on (no ref)",
    )
    p.add_argument("--out", type=Path, help="also write the figures here as JSON")
    args = p.parse_args()
    if (
        args.metrics_off_vs_on
        and args.ref is not None
        and args.endpoints == p.get_default("endpoints")
    ):
        args.ref, args.endpoints = None, args.ref  # the one positional given is the endpoints
    if (args.ref is None) != args.metrics_off_vs_on:
        p.error("give a git ref, or --metrics-off-vs-on")
    endpoints = args.endpoints.split(",")
    rc.LOGS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "base").mkdir()
        (t / "this").mkdir()
        if args.metrics_off_vs_on:
            base_src, label = rc.ROOT / "src", "metrics off"
        else:
            base_src, label = rc.export_tree(args.ref, t / "base"), args.ref
        servers = [
            rc.Server("base", base_src, t / "base", args.port),
            rc.Server("this", rc.ROOT / "src", t / "this", args.port + 1),
        ]
        if args.metrics_off_vs_on:
            servers[0].env["COGVIEW_METRICS"] = "false"
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
    ratios, paired = {}, {}
    for e in endpoints:
        base, this = out["base"][e], out["this"][e]
        ratios[e] = round(this["api_cpu_ms_median"] / base["api_cpu_ms_median"], 4)
        # Each round measures both servers back to back: the median of the rounds' own ratios
        # is less moved by the machine's drift between rounds than the ratio of the medians.
        per_round = [
            b / a for a, b in zip(base["api_cpu_ms_runs"], this["api_cpu_ms_runs"], strict=True)
        ]
        paired[e] = round(statistics.median(per_round), 4)
        print(
            f"{e:20s} {label} {base['api_cpu_ms_median']:.3f} ms {base['api_cpu_ms_runs']}"
            f"  this {this['api_cpu_ms_median']:.3f} ms {this['api_cpu_ms_runs']}"
            f"  this/base {ratios[e]:.3f} (paired by round {paired[e]:.3f})"
        )
    if args.out is not None:
        result = {
            "bench": "request_ab",
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
            "base": label,
            "this": "this tree" + (", metrics on" if args.metrics_off_vs_on else ""),
            "rounds": args.rounds,
            "seconds": args.seconds,
            "api_cpu_ms": out,
            "this_over_base": ratios,
            "this_over_base_paired_median": paired,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
