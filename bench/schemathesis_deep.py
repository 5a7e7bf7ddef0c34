"""A deeper schemathesis run than CI's (tests/api/test_schemathesis.py), against a real `serve`.

CI runs 25 derandomized examples per operation and mode in process. This runs the schemathesis
CLI against `cogview-api serve --workers 1 --model test-echo` (a real process, SQLite) with a
funded key: every operation of /openapi.json (native, OpenAI and Zhipu surfaces, health), all
phases (examples, coverage, fuzzing and stateful, which follows the schema's links, e.g. a
submit's task id into get, events and cancel), positive and negative data, `--max-examples`
per operation, every check but the two CI leaves out for its reasons (`positive_data_acceptance`,
`ignored_auth`). `Prefer` is pinned to `wait=0`: a generated `wait=60` would only hold requests.

It reports operations, requests, failures by check and the 5xx answers found (goal 0; the
"Stateful tests" scenarios count in requests, not as an operation), as JSON under
bench/results/, and keeps schemathesis' own reports (JUnit, NDJSON) in --report-dir.
Not part of the test suite: it takes minutes.

    .venv/bin/python bench/schemathesis_deep.py --max-examples 200 --max-time 600
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from abuse import ROOT, Server


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--max-time", type=int, default=600, help="seconds for the whole run")
    p.add_argument("--seed", type=int, default=20261202)
    p.add_argument("--workers", type=int, default=2, help="schemathesis' concurrent workers")
    p.add_argument("--src", type=Path, default=ROOT / "src")
    p.add_argument("--report-dir", type=Path, default=Path(tempfile.gettempdir()) / "st-deep")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/schemathesis-deep.json")
    p.add_argument(
        "--from-events",
        type=Path,
        help="only rewrite --out's figures from an NDJSON event file of an earlier run",
    )
    return p.parse_args()


def read_events(path: Path) -> dict[str, Any]:
    """Operations, requests, failures and 5xx from schemathesis' NDJSON event stream."""
    operations: set[str] = set()
    requests = 0
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    server_errors: list[dict[str, Any]] = []
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a run cut short leaves its last line unfinished
            continue
        for kind, body in event.items():
            if kind != "ScenarioFinished":
                continue
            recorder = body.get("recorder", {})
            if recorder.get("label") and recorder["label"] != "Stateful tests":
                operations.add(recorder["label"])
            for interactions in recorder.get("interactions", {}).values():
                response = interactions.get("response") or {}
                status = response.get("status_code")
                requests += 1
                if status is not None:
                    statuses[int(status)] += 1
                    if int(status) >= 500:
                        req = interactions.get("request", {})
                        server_errors.append(
                            {"status": status, "method": req.get("method"), "uri": req.get("uri")}
                        )
            for checks in recorder.get("checks", {}).values():
                for check in checks:
                    if str(check.get("status")).lower() == "failure":
                        failures[check.get("name", "?")] += 1
    return {
        "operations": len(operations),
        "operation_labels": sorted(operations),
        "requests": requests,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "failed_checks": dict(failures),
        "server_errors": len(server_errors),
        "server_error_samples": server_errors[:20],
    }


def main() -> int:
    args = parse_args()
    if args.from_events:
        result = json.loads(args.out.read_text()) if args.out.exists() else {}
        result.update(read_events(args.from_events))
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"rewrote {args.out}")
        return 0
    args.report_dir.mkdir(parents=True, exist_ok=True)
    ndjson = args.report_dir / "events.ndjson"
    with tempfile.TemporaryDirectory(prefix="st-deep-") as tmp:
        server = Server(Path(tmp), args.src, COGVIEW_SYNC_WAIT_SECONDS="20")
        key = server.key("schemathesis")
        server.start(workers=1)
        t0 = time.monotonic()
        try:
            cmd = [
                str(Path(sys.executable).with_name("st")),
                "run",
                server.base + "/openapi.json",
                "--header",
                f"Authorization: Bearer {key}",
                "--header",
                "Prefer: wait=0",
                "--phases",
                "examples,coverage,fuzzing,stateful",
                "--mode",
                "all",
                "--checks",
                "all",
                "--exclude-checks",
                "positive_data_acceptance,ignored_auth",
                "--max-examples",
                str(args.max_examples),
                "--max-time",
                str(args.max_time),
                "--seed",
                str(args.seed),
                "--workers",
                str(args.workers),
                "--request-timeout",
                "60",
                "--continue-on-failure",
                "--suppress-health-check",
                "all",
                "--report",
                "junit,ndjson",
                "--report-dir",
                str(args.report_dir),
                "--report-ndjson-path",
                str(ndjson),
                "--no-color",
            ]
            # bench/schemathesis_hooks.py: a serializer for the batch route's JSON Lines body.
            hooks = {"SCHEMATHESIS_HOOKS": "schemathesis_hooks", "PYTHONPATH": str(ROOT / "bench")}
            run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **hooks})
        finally:
            server.stop()
        seconds = time.monotonic() - t0
        log_tail = server.log.read_text()[-4000:] if server.log.exists() else ""
    (args.report_dir / "st-output.txt").write_text(run.stdout + run.stderr)
    figures = read_events(ndjson) if ndjson.exists() else {}
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result = {
        "bench": "schemathesis_deep",
        "commit": commit,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "schemathesis_exit": run.returncode,
        "seconds": round(seconds, 1),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        **figures,
        "summary_tail": (run.stdout + run.stderr)[-3000:],
        "server_log_tail": log_tail,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(
        json.dumps(
            {
                k: result.get(k)
                for k in (
                    "operations",
                    "requests",
                    "server_errors",
                    "failed_checks",
                    "schemathesis_exit",
                )
            }
        )
    )
    print(f"wrote {args.out}; schemathesis output in {args.report_dir}/st-output.txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
