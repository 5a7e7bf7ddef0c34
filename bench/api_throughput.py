"""Requests per second of the HTTP tier: submits, then task polls, from C closed-loop clients.

`cogview-api serve --workers 0` (API only: tasks just queue, nothing generates) on loopback, a
fresh SQLite database, one key with plenty of credits. C client threads, each with its own
keep-alive `httpx.Client`, send requests back to back for a fixed time per phase:

  phase 1 "submit": POST /api/v1/images/generations with the hosted API's example body;
  phase 2 "poll":   GET /api/v1/tasks/{id}, cycling through the tasks made in phase 1.

The load generator runs on the same machine as the server and takes CPU from it, so on a small
machine these are lower bounds of what the server alone could do.

    .venv/bin/python bench/api_throughput.py --out bench/results/api_throughput-cpu.json
"""

from __future__ import annotations

import argparse
import itertools
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from api_overhead import (
    code_version,
    cpu_audit,
    emit,
    machine_info,
    process_cpu_s,
    running_server,
    server_env,
)

EXAMPLE_BODY = {
    "model": "cogview-4",
    "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
    "size": "1024*1024",
    "quality": "hd",
}
MAX_QUEUE = 10_000_000

# One request of a phase: given the client, returns the response.
Request = Callable[[httpx.Client], httpx.Response]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    p.add_argument("--warmup", type=float, default=1.0, help="untimed seconds before each phase")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    return p.parse_args()


@dataclass
class Samples:
    """What one client saw: per-request latency, status (0 = transport error), task ids."""

    latencies: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)


def client_loop(make_client: Callable[[], httpx.Client], request: Request, until: float) -> Samples:
    out = Samples()
    with make_client() as client:
        while time.perf_counter() < until:
            t0 = time.perf_counter()
            try:
                r = request(client)
                status = r.status_code
            except httpx.HTTPError:
                r, status = None, 0
            out.latencies.append(time.perf_counter() - t0)
            out.statuses.append(status)
            if r is not None and status == 200 and r.request.method == "POST":
                out.task_ids.append(r.json()["data"]["task_id"])
    return out


def run_phase(
    make_client: Callable[[], httpx.Client], requests: Iterator[Request], clients: int, secs: float
) -> tuple[list[Samples], float]:
    """`clients` threads, each looping its own request function for `secs` seconds."""
    results: list[Samples] = [Samples()] * clients
    start = time.perf_counter()
    until = start + secs

    def worker(i: int, request: Request) -> None:
        results[i] = client_loop(make_client, request, until)

    threads = [threading.Thread(target=worker, args=(i, next(requests))) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, time.perf_counter() - start


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    index = max(0, min(len(sorted_values) - 1, round(q / 100 * len(sorted_values) + 0.5) - 1))
    return sorted_values[index]


def report(results: list[Samples], elapsed: float) -> dict[str, Any]:
    latencies = sorted(x for r in results for x in r.latencies)
    statuses = Counter(s for r in results for s in r.statuses)
    ok = statuses.get(200, 0)
    ms = [x * 1000 for x in latencies]
    return {
        "requests": len(latencies),
        "ok": ok,
        "errors": len(latencies) - ok,
        "status_counts": {str(k): v for k, v in sorted(statuses.items())},
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "latency_ms": {
            "p50": round(percentile(ms, 50), 2),
            "p90": round(percentile(ms, 90), 2),
            "p99": round(percentile(ms, 99), 2),
            "max": round(ms[-1], 2),
            "mean": round(sum(ms) / len(ms), 2),
        },
    }


def submit(client: httpx.Client) -> httpx.Response:
    return client.post("/api/v1/images/generations", json=EXAMPLE_BODY)


def pollers(task_ids: list[str], clients: int) -> Iterator[Request]:
    """One request function per client, each cycling through its own slice of the tasks."""
    for i in range(clients):
        own = itertools.cycle(task_ids[i::clients] or task_ids)

        def poll(client: httpx.Client, own: Iterator[str] = own) -> httpx.Response:
            return client.get(f"/api/v1/tasks/{next(own)}")

        yield poll


def timed_phase(
    make_client: Callable[[], httpx.Client],
    requests: Callable[[], Iterator[Request]],
    args: argparse.Namespace,
    server_pid: int,
) -> tuple[dict[str, Any], list[Samples]]:
    """A warm-up, then the timed phase; with the CPU the server and the load generator used."""
    run_phase(make_client, requests(), args.clients, args.warmup)
    server0, own0 = process_cpu_s(server_pid), time.process_time()
    results, elapsed = run_phase(make_client, requests(), args.clients, args.duration)
    server1, own1 = process_cpu_s(server_pid), time.process_time()
    out = report(results, elapsed)
    out["load_generator_cpu_s"] = round(own1 - own0, 2)
    if server0 is not None and server1 is not None:
        out["server_cpu_s"] = round(server1 - server0, 2)
        out["server_cpu_ms_per_request"] = round(1000 * (server1 - server0) / out["requests"], 2)
    return out, results


def measure(
    make_client: Callable[[], httpx.Client], args: argparse.Namespace, server_pid: int
) -> dict[str, Any]:
    submit_phase, results = timed_phase(
        make_client, lambda: itertools.repeat(submit), args, server_pid
    )
    task_ids = [t for r in results for t in r.task_ids]
    submit_phase["tasks_created"] = len(task_ids)
    poll_phase, _ = timed_phase(
        make_client, lambda: pollers(task_ids, args.clients), args, server_pid
    )
    poll_phase["distinct_tasks_polled"] = len(task_ids)
    return {"submit": submit_phase, "poll": poll_phase}


def main() -> int:
    args = parse_args()
    env = server_env(
        args.cache_dir,
        {
            "COGVIEW_MAX_QUEUE": str(MAX_QUEUE),
            "COGVIEW_MAX_WAITING_PER_KEY": str(MAX_QUEUE),
            # One key makes every submit: a rate it never reaches (the check still runs).
            "COGVIEW_SUBMIT_RATE": "1000000",
            "COGVIEW_SUBMIT_BURST": "1000000",
        },
    )
    credits = 4 * MAX_QUEUE
    print(f"api_throughput: {args.clients} clients, {args.duration}s per phase", file=sys.stderr)
    with (
        cpu_audit() as audit,
        running_server(["--workers", "0"], env, ready_path="/healthz", credits=credits) as srv,
    ):

        def make_client() -> httpx.Client:
            headers = {"Authorization": f"Bearer {srv.key}"}
            return httpx.Client(base_url=srv.base_url, headers=headers, timeout=30)

        phases = measure(make_client, args, srv.pid)
    result = {
        "benchmark": "api_throughput",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": code_version(),
        "config": {
            "server": "cogview-api serve --workers 0 (API only), SQLite, loopback",
            "COGVIEW_MAX_QUEUE": MAX_QUEUE,
            "clients": args.clients,
            "duration_s_per_phase": args.duration,
            "warmup_s_per_phase": args.warmup,
            "load_generator": "Python threads, one keep-alive httpx.Client each, closed loop",
            "submit_body": EXAMPLE_BODY,
        },
        "notes": [
            "The load generator shares the machine's CPU cores with the server: lower bounds.",
            "errors = every answer other than 200, plus transport errors (status 0).",
            "server_cpu_s / load_generator_cpu_s: CPU time of the server process and of this "
            "load generator during the timed phase (from /proc and time.process_time).",
            "The poll phase reads the tasks the submit phase created, all still queued.",
            "other_cpu: CPU time used by processes other than this benchmark and its server "
            "over the whole run (from /proc/stat); near 0 means no competition for the cores.",
        ],
        **phases,
        "other_cpu": audit,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
