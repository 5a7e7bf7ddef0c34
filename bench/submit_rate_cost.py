"""What the per-key submit rate costs a submit: the submit service in this process, on SQLite,
with the rate on (a rate no key reaches, so its UPDATE runs and admits every time) and off
(`COGVIEW_SUBMIT_RATE=0`), interleaved round by round so a drift of the machine's speed hits
both. CPU time of this process (time.process_time) per submit; no HTTP, so the difference is
the rate's own statement and bookkeeping, without wrk's or uvicorn's noise.

Each key makes `--per-key` submits (under the waiting limit), then a fresh key takes over.

    .venv/bin/python bench/submit_rate_cost.py --out bench/results/submit_rate_cost-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest, Size
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.store.db import Database

ROOT = Path(__file__).resolve().parent.parent


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--submits", type=int, default=1000, help="submits per mode and round")
    p.add_argument("--per-key", type=int, default=50)
    p.add_argument("--out", type=Path)
    return p.parse_args()


def run_mode(db: Database, settings: Settings, submits: int, per_key: int) -> float:
    """CPU ms per submit over `submits` submits."""
    request = GenerationRequest(
        model="cogview-4", prompt="a lighthouse", size=Size(512, 512), quality="standard", n=1
    )
    keys = [
        key_service.create_key(db, name="bench", credits=10**9)[0]
        for _ in range(-(-submits // per_key))
    ]
    start = time.process_time()
    for i in range(submits):
        generation.submit(db, settings, key=keys[i // per_key], request=request)
    return (time.process_time() - start) * 1000 / submits


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings(
            database_url=f"sqlite:///{tmp}/bench.db",
            storage_url=f"file://{tmp}/images",
            model="test-echo",
            workers=0,
            max_queue=10**9,
            submit_burst=1_000_000,
        )
        modes = {
            "rate_on": base.model_copy(update={"submit_rate": 1_000_000.0}),
            "rate_off": base.model_copy(update={"submit_rate": 0.0}),
        }
        db = Database(base.database_url)
        db.migrate()
        try:
            run_mode(db, modes["rate_on"], 200, args.per_key)  # warm up both paths
            run_mode(db, modes["rate_off"], 200, args.per_key)
            runs: dict[str, list[float]] = {m: [] for m in modes}
            for _ in range(args.rounds):
                for name, settings in modes.items():
                    runs[name].append(round(run_mode(db, settings, args.submits, args.per_key), 4))
        finally:
            db.dispose()
    medians = {m: statistics.median(v) for m, v in runs.items()}
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "bench": "submit_rate_cost",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "commit": commit,
        "python": platform.python_version(),
        "rounds": args.rounds,
        "submits_per_round": args.submits,
        "per_key": args.per_key,
        "cpu_ms_per_submit_runs": runs,
        "cpu_ms_per_submit_median": medians,
        "rate_cost_ms": round(medians["rate_on"] - medians["rate_off"], 4),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
