"""Requests per second of the HTTP tier on PostgreSQL, with 1 and then 2 API processes.

A throwaway PostgreSQL cluster (tests/pg.py: initdb + pg_ctl in a temp folder, loopback only),
a fresh database per run, and P `cogview-api serve --workers 0` processes on their own loopback
ports (API only: tasks just queue, nothing generates, no torch). The load comes from `wrk` (one
wrk process per API process, started together and summed, C/P connections each), 10 s a phase
after a 1 s warm-up:

  phase "submit": POST /api/v1/images/generations with the hosted API's example body;
  phase "poll":   GET /api/v1/tasks/{id}, cycling through the tasks the submit phase made.

Each wrk writes its latency distribution (1,090 of its own percentiles), so the p50/p99 over
both API processes are of all their requests together, not averages of two percentiles.
wrk is C and event-driven: it uses far less CPU per request than the API does, which matters on
a small machine where the load generator, PostgreSQL and the API processes share the same
cores. The CPU each of them used is reported.

    apt-get install wrk
    .venv/bin/python bench/api_throughput_pg.py --out bench/results/api_throughput_pg-cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

from api_overhead import (
    code_version,
    cogview_api_command,
    cogview_process,
    cpu_counters_s,
    emit,
    free_port,
    machine_info,
    process_cpu_s,
    server_env,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/pg.py starts the throwaway cluster

from tests import pg  # noqa: E402

EXAMPLE_BODY = {
    "model": "cogview-4",
    "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
    "size": "1024*1024",
    "quality": "hd",
}
MAX_QUEUE = 10_000_000

# The wrk scripts. `done` writes the summary and the latency distribution as JSON to $WRK_OUT:
# wrk's own percentiles (`latency:percentile(q)`, microseconds) at the midpoints of 990 slices of
# 0.1 % up to the 99th percentile and of 100 slices of 0.01 % above it, so the distributions of
# several wrk processes can be merged, weighted by their request counts (`merged_percentiles`).
LUA_REPORT = r"""
done = function(summary, latency, requests)
  local out = assert(io.open(os.getenv("WRK_OUT"), "w"))
  local e = summary.errors
  out:write(string.format(
    '{"requests": %d, "duration_us": %d, "errors": {"connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d}, "max_us": %d, "mean_us": %f, "slices": [',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.max, latency.mean))
  for i = 0, 989 do
    out:write(string.format('[0.1, %d], ', latency:percentile(i / 10 + 0.05)))
  end
  for i = 0, 99 do
    local sep = (i < 99) and ", " or ""
    out:write(string.format('[0.01, %d]%s', latency:percentile(99 + i / 100 + 0.005), sep))
  end
  out:write("]}\n")
  out:close()
end
"""

LUA_SUBMIT = (
    r"""
wrk.method = "POST"
wrk.body = os.getenv("WRK_BODY")
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("WRK_KEY")
"""
    + LUA_REPORT
)

LUA_POLL = (
    r"""
local ids = {}
local i = 0
init = function(args)
  for line in io.lines(os.getenv("WRK_IDS")) do ids[#ids + 1] = line end
  i = tonumber(os.getenv("WRK_OFFSET")) % #ids
end
request = function()
  i = i % #ids + 1
  return wrk.format("GET", "/api/v1/tasks/" .. ids[i],
                    {Authorization = "Bearer " .. os.getenv("WRK_KEY")})
end
"""
    + LUA_REPORT
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # wrk takes whole seconds.
    p.add_argument("--duration", type=int, default=10, help="seconds per phase (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed seconds before each phase")
    p.add_argument(
        "--connections", type=int, default=8, help="wrk connections in all, split evenly (8)"
    )
    p.add_argument(
        "--processes", type=int, nargs="+", default=[1, 2], help="API process counts (1 2)"
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each phase, wait up to this many seconds for 5 quiet seconds (120)",
    )
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "cogview-api")
    p.add_argument(
        "--src",
        type=Path,
        help="run the servers from this cogview_api source folder (PYTHONPATH), e.g. an earlier "
        "commit's `src` from `git archive`, to compare designs with the same script",
    )
    p.add_argument("--out", type=Path, help="also write the JSON result here")
    return p.parse_args()


# -- CPU accounting ---------------------------------------------------------------------------


def postgres_pids(cluster: pg.PgCluster) -> list[int]:
    """The postmaster and its children (backends, writer, ...), from /proc."""
    master = int((cluster.data / "postmaster.pid").read_text().split()[0])
    pids = [master]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == master:
                pids.append(int(entry.name))
    return pids


def machine_busy_s() -> float:
    """Busy CPU seconds of all cores since boot, the hypervisor's steal included."""
    counters = cpu_counters_s()
    if counters is None:
        raise RuntimeError("this benchmark needs Linux /proc/stat")
    busy, steal = counters
    return busy + steal


class CpuMeter:
    """CPU seconds of the API processes, PostgreSQL, wrk, this script and the machine."""

    def __init__(self, api_pids: list[int], cluster: pg.PgCluster) -> None:
        self.api_pids = api_pids
        self.cluster = cluster

    def _snapshot(self) -> dict[str, Any]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        own = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "api": {p: process_cpu_s(p) or 0.0 for p in self.api_pids},
            "postgres": {p: process_cpu_s(p) or 0.0 for p in postgres_pids(self.cluster)},
            "wrk": kids.ru_utime + kids.ru_stime,  # wrk runs are the only children reaped
            "bench": own.ru_utime + own.ru_stime,
            "machine": machine_busy_s(),
        }

    @contextmanager
    def measure(self) -> Iterator[dict[str, Any]]:
        out: dict[str, Any] = {}
        before, t0 = self._snapshot(), time.perf_counter()
        yield out
        after, wall = self._snapshot(), time.perf_counter() - t0
        api = sum(after["api"][p] - before["api"].get(p, 0.0) for p in after["api"])
        pgs = sum(v - before["postgres"].get(p, 0.0) for p, v in after["postgres"].items())
        used = {
            "api_processes": api,
            "postgres": pgs,
            "wrk": after["wrk"] - before["wrk"],
            "bench_script": after["bench"] - before["bench"],
        }
        machine = after["machine"] - before["machine"]
        out.update({k: round(v, 2) for k, v in used.items()})
        out["machine_busy"] = round(machine, 2)
        out["other"] = round(max(0.0, machine - sum(used.values())), 2)
        out["wall_s"] = round(wall, 2)
        out["cores"] = os.cpu_count()


def per_request_cpu(phase: dict[str, Any]) -> dict[str, float]:
    """CPU milliseconds per request of the API processes and of PostgreSQL: unlike the rates,
    these hardly change when other jobs take cores from the benchmark."""
    cpu, n = phase["cpu_s"], phase["requests"]
    return {
        "api_processes": round(1000 * cpu["api_processes"] / n, 2),
        "postgres": round(1000 * cpu["postgres"] / n, 2),
        "wrk": round(1000 * cpu["wrk"] / n, 3),
    }


def wait_until_quiet(max_wait: float, busy_below: float = 0.15, seconds: int = 5) -> dict[str, Any]:
    """Wait (at most `max_wait` s) for `seconds` one-second samples in a row in which the whole
    machine was under `busy_below` busy, so that other jobs' load does not end up in a phase."""
    start, quiet = time.monotonic(), 0
    last = machine_busy_s()
    while quiet < seconds and time.monotonic() - start < max_wait:
        time.sleep(1.0)
        now = machine_busy_s()
        quiet = quiet + 1 if (now - last) / (os.cpu_count() or 1) < busy_below else 0
        last = now
    return {"waited_s": round(time.monotonic() - start, 1), "quiet": quiet >= seconds}


# -- wrk ----------------------------------------------------------------------------------------


def run_wrk(
    urls: list[str], script: str, env: dict[str, str], connections: int, secs: int
) -> list[dict[str, Any]]:
    """One wrk per URL, all at once, each with its share of the connections."""
    per = max(1, connections // len(urls))
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        lua = Path(tmp) / "script.lua"
        lua.write_text(script)
        procs = []
        for i, url in enumerate(urls):
            out = Path(tmp) / f"out-{i}.json"
            wrk_env = {**env, "WRK_OUT": str(out), "WRK_OFFSET": str(i * 7919)}
            cmd = ["wrk", "-t1", f"-c{per}", f"-d{secs}s", "--timeout", "10s", "--latency"]
            cmd += ["-s", str(lua), url]
            procs.append((subprocess.Popen(cmd, env=wrk_env, stdout=subprocess.PIPE), out))
        results = []
        for proc, out in procs:
            stdout, _ = proc.communicate(timeout=secs + 60)
            if proc.returncode != 0 or not out.exists():
                raise RuntimeError(f"wrk failed ({proc.returncode}): {stdout.decode()}")
            results.append(json.loads(out.read_text()))
        return results


def merged_percentiles(runs: list[dict[str, Any]], qs: list[float]) -> list[float]:
    """Percentiles (us) of several wrk runs together: each run's slices are weighted atoms
    (share of that run's requests), pooled and sorted. Exact to a slice's width (0.1 % of the
    requests below p99, 0.01 % above)."""
    atoms = sorted(
        (value, share / 100 * run["requests"]) for run in runs for share, value in run["slices"]
    )
    total = sum(weight for _, weight in atoms)
    out = []
    for q in qs:
        seen, target = 0.0, q / 100 * total
        for value, weight in atoms:
            seen += weight
            if seen >= target - 1e-9:
                out.append(float(value))
                break
    return out


def combine(runs: list[dict[str, Any]], connections: int) -> dict[str, Any]:
    """The wrk runs of one phase, summed; percentiles over all their requests."""
    requests = sum(run["requests"] for run in runs)
    errors: Counter[str] = Counter()
    for run in runs:
        errors.update(run["errors"])
    elapsed = max(run["duration_us"] for run in runs) / 1e6
    p50, p90, p99, p999 = merged_percentiles(runs, [50, 90, 99, 99.9])
    mean = sum(run["mean_us"] * run["requests"] for run in runs) / requests
    # Each connection has one request in flight at a time, so over a run the latencies add up
    # to at most connections x duration: mean latency x rate <= connections. Above 1, wrk's
    # latency figures of that run do not add up (seen here when the cores were saturated);
    # its request counts do.
    little = [
        round(run["mean_us"] * run["requests"] / run["duration_us"] / connections, 2)
        for run in runs
    ]
    return {
        "requests": requests,
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(requests / elapsed, 1),
        "per_process_requests_per_s": [
            round(run["requests"] / (run["duration_us"] / 1e6), 1) for run in runs
        ],
        "per_process_p50_p99_ms": [
            [round(v / 1000, 2) for v in merged_percentiles([run], [50, 99])] for run in runs
        ],
        "errors": dict(errors),
        "busy_connections_share": little,
        "latency_ms": {
            "p50": round(p50 / 1000, 2),
            "p90": round(p90 / 1000, 2),
            "p99": round(p99 / 1000, 2),
            "p99.9": round(p999 / 1000, 2),
            "max": round(max(run["max_us"] for run in runs) / 1000, 2),
            "mean": round(mean / 1000, 2),
        },
    }


# -- one configuration --------------------------------------------------------------------------


def task_ids(url: str) -> list[str]:
    with psycopg.connect(url) as conn:
        return [row[0] for row in conn.execute("SELECT id FROM tasks ORDER BY seq")]


def make_key(env: dict[str, str], workdir: Path) -> str:
    made = subprocess.run(
        [*cogview_api_command(), "keys", "create", "--name", "bench"]
        + ["--credits", str(4 * MAX_QUEUE), "--json"],
        cwd=workdir, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return str(json.loads(made.stdout)["key"])


def run_config(
    processes: int, cluster: pg.PgCluster, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    """P API processes on a fresh database: a submit phase, then a poll phase."""
    url = cluster.create_database()
    env = server_env(
        args.cache_dir,
        {
            "COGVIEW_DATABASE_URL": url,
            "COGVIEW_MAX_QUEUE": str(MAX_QUEUE),
            "COGVIEW_MAX_WAITING_PER_KEY": str(MAX_QUEUE),  # one key makes every submit
            "COGVIEW_SUBMIT_RATE": "1000000",  # never reached; the check still runs
            "COGVIEW_SUBMIT_BURST": "1000000",
        },
    )
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    subprocess.run(
        [*cogview_api_command(), "migrate"], cwd=workdir, env=env, check=True, capture_output=True
    )
    key = make_key(env, workdir)
    with ExitStack() as stack:
        ports = [free_port() for _ in range(processes)]
        procs = []
        for port in ports:
            log = workdir / f"serve-p{processes}-{port}.log"
            serve = ["serve", "--workers", "0", "--port", str(port)]
            procs.append(stack.enter_context(cogview_process(serve, env, log)))
        for proc, port in zip(procs, ports, strict=True):
            wait_for(
                proc, f"http://127.0.0.1:{port}/healthz", workdir / f"serve-p{processes}-{port}.log"
            )
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        meter = CpuMeter([p.pid for p in procs], cluster)
        wrk_env = {**os.environ, "WRK_KEY": key, "WRK_BODY": json.dumps(EXAMPLE_BODY)}
        out: dict[str, Any] = {"api_processes": processes}

        submit_urls = [f"{u}/api/v1/images/generations" for u in urls]
        quiet = wait_until_quiet(args.quiet_wait)
        run_wrk(submit_urls, LUA_SUBMIT, wrk_env, args.connections, args.warmup)
        with meter.measure() as cpu:
            runs = run_wrk(submit_urls, LUA_SUBMIT, wrk_env, args.connections, args.duration)
        out["submit"] = {
            **combine(runs, max(1, args.connections // processes)),
            "cpu_s": cpu,
            "machine_before": quiet,
        }
        out["submit"]["cpu_ms_per_request"] = per_request_cpu(out["submit"])
        ids = task_ids(url)
        out["submit"]["tasks_in_database"] = len(ids)

        ids_file = workdir / f"ids-p{processes}.txt"
        ids_file.write_text("\n".join(ids) + "\n")
        poll_env = {**wrk_env, "WRK_IDS": str(ids_file)}
        quiet = wait_until_quiet(args.quiet_wait)
        run_wrk(urls, LUA_POLL, poll_env, args.connections, args.warmup)
        with meter.measure() as cpu:
            runs = run_wrk(urls, LUA_POLL, poll_env, args.connections, args.duration)
        out["poll"] = {
            **combine(runs, max(1, args.connections // processes)),
            "cpu_s": cpu,
            "machine_before": quiet,
        }
        out["poll"]["cpu_ms_per_request"] = per_request_cpu(out["poll"])
    cluster.drop_database(url)
    return out


def main() -> int:
    args = parse_args()
    if shutil.which("wrk") is None:
        print("wrk not found: apt-get install wrk", file=sys.stderr)
        return 2
    bindir = pg.find_bindir()
    if bindir is None:
        print(pg.missing_message(), file=sys.stderr)
        return 2
    cluster = pg.start_cluster(bindir)
    try:
        with tempfile.TemporaryDirectory(prefix="cogview-bench-") as tmp:
            runs = []
            for processes in args.processes:
                print(f"api_throughput_pg: {processes} API process(es)", file=sys.stderr)
                runs.append(run_config(processes, cluster, args, Path(tmp)))
    finally:
        cluster.stop()
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout
    result = {
        "benchmark": "api_throughput_pg",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "code": {**code_version(), "servers_src": str(args.src) if args.src else "this tree"},
        "config": {
            "server": "P x `cogview-api serve --workers 0` (API only), one PostgreSQL, loopback",
            "postgresql": f"{bindir}, tests/pg.py settings: fsync=off, synchronous_commit=off, "
            "full_page_writes=off, shared_buffers=32MB, max_connections=300",
            "COGVIEW_MAX_QUEUE": MAX_QUEUE,
            "connections_in_all": args.connections,
            "duration_s_per_phase": args.duration,
            "warmup_s_per_phase": args.warmup,
            "load_generator": f"{wrk_version.split(chr(10))[0].strip()}: one wrk (-t1) per API "
            "process, all at once, connections split evenly, closed loop (keep-alive)",
            "submit_body": EXAMPLE_BODY,
        },
        "notes": [
            "Everything shares the machine's cores: wrk, PostgreSQL and the API processes. "
            "cpu_s says how much each used during the timed phase; 'other' is the rest of the "
            "machine's busy time (other jobs, the kernel's share not billed to a process).",
            "errors: wrk's socket errors and answers with a status >= 400.",
            "busy_connections_share: per wrk, mean latency x request rate / connections. Each "
            "connection has one request in flight at a time, so it cannot exceed 1; above 1, "
            "the latency figures of that wrk run do not add up and are not to be trusted (seen "
            "when the cores were saturated); its request counts are.",
            "Percentiles are over all requests of a phase: each wrk reports 1,090 of its own "
            "percentiles (0.1 % slices to p99, 0.01 % above), merged by request counts.",
            "machine_before: whether the machine was quiet (5 s in a row under 15 % busy) "
            "before the phase, and how long that wait took; 'other' in cpu_s shows what "
            "competed during it. cpu_ms_per_request holds up under competition; rates do not.",
            "Each configuration gets a fresh database; the poll phase reads the tasks its "
            "submit phase created, all still queued (each answer carries a queue position).",
        ],
        "runs": runs,
    }
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
