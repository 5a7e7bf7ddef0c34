"""The CPU that the metrics add to one request, measured without a network or a database.

`bench/request_ab.py --metrics-off-vs-on` measures a poll end to end on two real servers, but on a
shared 2-core machine its rounds vary by more than the difference sought. This script measures
the difference itself: the app's HTTP middleware (`api/metrics.py`) around an ASGI app that
answers at once, against the same app without it, in one process, interleaved, in CPU time
(`time.process_time`). Route and status are those of a poll (`/api/v1/tasks/{task_id}`, 200).

    .venv/bin/python bench/metrics_overhead.py --out bench/results/metrics_overhead-cpu.json

The figure to compare with: a poll's API CPU (`request_ab.py` poll_completed, about 1 ms here).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from cogview_api.api.metrics import HttpMetrics

ROUTE = Route("/api/v1/tasks/{task_id}", endpoint=lambda request: None)
ROUTE.tags = ["native"]  # type: ignore[attr-defined]  # as FastAPI's APIRoute has


async def answer(scope: Scope, receive: Receive, send: Send) -> None:
    scope["route"] = ROUTE  # what the router does on a match
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    pass


async def cpu_per_request_us(app: Any, n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        scope: Scope = {"type": "http", "path": "/api/v1/tasks/x_cv4", "method": "GET"}
        await app(scope, receive, send)
    return 1e6 * (time.process_time() - started) / n


async def run(n: int, rounds: int) -> dict[str, Any]:
    plain, metered = answer, HttpMetrics(answer)
    await cpu_per_request_us(metered, 1000)  # the labelled series made once, as in a server
    off, on = [], []
    for _ in range(rounds):
        off.append(await cpu_per_request_us(plain, n))
        on.append(await cpu_per_request_us(metered, n))
    added = [b - a for a, b in zip(off, on, strict=True)]
    return {
        "off_us_runs": [round(x, 3) for x in off],
        "on_us_runs": [round(x, 3) for x in on],
        "added_us_median": round(statistics.median(added), 3),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--poll-cpu-ms", type=float, default=1.0, help="a poll's API CPU to compare")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    result: dict[str, Any] = {
        "bench": "metrics_overhead",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "requests_per_round": args.requests,
        **asyncio.run(run(args.requests, args.rounds)),
    }
    result["poll_cpu_ms"] = args.poll_cpu_ms
    result["added_share_of_poll"] = round(result["added_us_median"] / (1000 * args.poll_cpu_ms), 4)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
