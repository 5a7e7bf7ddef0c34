"""API CPU per request: the request path of this tree against a previous design, in one run.

Two servers (`serve --workers 0 --model test-echo`, SQLite, each its own database) run side by
side: this tree, and the tree of `--baseline` (a git ref, exported with `git archive` and run
from the same virtualenv through PYTHONPATH). Both are pinned to one core (`taskset`), wrk to the
other. For each endpoint and round the designs take turns (interleaved, so a drift of the
machine's speed hits both): wrk runs for `--seconds`, and the server process's CPU time (user +
system, all its threads, from /proc) divided by the requests wrk made is the API CPU per request.
`/healthz` is the yardstick: the framework's own cost, on the same process and core.

Endpoints: `/healthz`; a poll of a finished task (`GET /api/v1/tasks/{id}`, COMPLETED with one
image); `/api/v1/account`; a poll of the newest waiting task; a submit (POST, 512x512). Then
the backlog grows to `--backlog-large` waiting tasks (rows copied in SQL) and the polls and the
submit run again. Last, `--http-processes` 1 vs 2 of this tree: polls/s and latency with wrk on
`--connections` connections (no pinning: the two HTTP processes and wrk share both cores), then
the latency at a held rate of `--paced-rate` polls/s: wrk (C, one thread, the cheapest load
generator here) with a Lua `delay()` that hands each request the next free slot of a global
schedule, one slot every 1/rate s, so the rate is held whatever the latency while connections
are free; a server that falls behind is not caught up on, so a shortfall shows in the rate.
`--paced-tool hey` runs the same load with hey (Go, several times wrk's CPU per request, which
on two cores takes from the servers it measures).

    .venv/bin/python bench/request_cost.py --out bench/results/request_cost-cpu.json

Needs wrk, hey for `--paced-tool hey` (Debian: `apt-get install wrk hey`) and taskset (util-linux).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import sqlite3
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
LOGS = Path(tempfile.gettempdir()) / "request_cost-logs"
SUBMIT_BODY = json.dumps(
    {"model": "cogview-4", "prompt": "a lighthouse at dusk", "size": "512x512"}
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--baseline", default="0b04411", help="git ref of the previous design")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=int, default=3, help="wrk duration per measurement")
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--backlog-small", type=int, default=100)
    p.add_argument("--backlog-large", type=int, default=100_000)
    p.add_argument(
        "--submit-keys", type=int, default=400, help="keys the submits rotate over (one a request)"
    )
    p.add_argument(
        "--paced-rate",
        type=int,
        default=1500,
        help="polls/s held (a paced load, not a saturating one) for the latency at a rate",
    )
    p.add_argument(
        "--paced-connections",
        type=int,
        default=32,
        help="connections (wrk) or workers (hey) of the paced load, each one request at a time: "
        "N must exceed rate x latency or the load falls short of the rate",
    )
    p.add_argument(
        "--paced-tool",
        choices=("wrk", "hey"),
        default="wrk",
        help="the paced load's generator (see the module docstring)",
    )
    p.add_argument(
        "--only-throughput",
        action="store_true",
        help="skip the per-request CPU phases; only the HTTP-processes throughput and paced load",
    )
    p.add_argument(
        "--only-cost",
        action="store_true",
        help="skip the HTTP-processes throughput and paced load; only the per-request CPU phases",
    )
    p.add_argument("--out", type=Path)
    return p.parse_args()


def proc_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_cpu_s() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, to say how quiet it was."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    hz = os.sysconf("SC_CLK_TCK")
    return (sum(values) - idle) / hz, sum(values) / hz


class Server:
    def __init__(self, name: str, src: Path, workdir: Path, port: int, http_processes: int = 1):
        self.name, self.src, self.workdir, self.port = name, src, workdir, port
        self.http_processes = http_processes
        self.db_path = workdir / "db.sqlite"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "COGVIEW_DATABASE_URL": f"sqlite:///{self.db_path}",
            "COGVIEW_STORAGE_URL": f"file://{workdir / 'images'}",
            "COGVIEW_MODEL": "test-echo",
            "COGVIEW_MAX_QUEUE": "10000000",
            # The per-key limits keep their defaults: submits rotate over `--submit-keys` keys,
            # as many tenants would send them, and the backlog belongs to another key. Each key
            # stays far under the default submit rate (10 a second), so every submit runs the
            # rate's UPDATE and is admitted.
            "COGVIEW_LOG_LEVEL": "warning",
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.base = f"http://127.0.0.1:{port}"

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                "from cogview_api.cli import main; raise SystemExit(main())",
                *args,
            ],
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        )
        return out.stdout

    def start(self, *, workers: int, cpu: str | None) -> None:
        cmd = [
            sys.executable,
            "-c",
            "from cogview_api.cli import main; raise SystemExit(main())",
            "serve",
            "--port",
            str(self.port),
            "--workers",
            str(workers),
        ]
        if self.http_processes > 1:
            cmd += ["--http-processes", str(self.http_processes)]
        if cpu is not None:
            cmd = ["taskset", "-c", cpu, *cmd]
        log = open(LOGS / f"{self.name}-serve.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not start; see {log.name}")

    def pids(self) -> list[int]:
        """The server process and its children (the HTTP processes of --http-processes)."""
        assert self.proc is not None
        out = subprocess.run(["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True)
        return [self.proc.pid, *(int(p) for p in out.stdout.split())]

    def cpu_s(self) -> float:
        return sum(proc_cpu_s(p) for p in self.pids())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            self.proc = None


def export_tree(ref: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", ref, "src"],
        check=True,
        capture_output=True,
    ).stdout
    tar_path = into / "src.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    return into / "src"


def seed(server: Server) -> dict[str, str]:
    """A funded key and one COMPLETED task with an image, made by an echo worker."""
    out = server.cli("keys", "create", "--name", "bench", "--credits", "1000000000", "--json")
    secret = json.loads(out)["key"]
    server.start(workers=1, cpu=None)
    try:
        headers = {"Authorization": f"Bearer {secret}", "Prefer": "wait=30"}
        r = httpx.post(
            server.base + "/api/v1/images/generations",
            content=SUBMIT_BODY,
            headers={**headers, "Content-Type": "application/json"},
            timeout=60,
        )
        if r.status_code != 200:
            raise RuntimeError(f"seed submit: {r.status_code} {r.text}")
        done = r.json()["data"]
        assert done["status"] == "COMPLETED", done
    finally:
        server.stop()
    return {"secret": secret, "done": done["task_id"]}


def clone_keys(db_path: Path, secret: str, n: int) -> list[str]:
    """`n` more funded keys, copied in SQL from the key of `secret`; returns their secrets.

    The first one holds the backlog (grow_backlog); submits rotate over the others.
    """
    con = sqlite3.connect(db_path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(api_keys)")]
    src = hashlib.sha256(secret.encode()).hexdigest()
    fresh = {"id": "?", "key_hash": "?", "name": "?"}
    secrets_ = [f"sk-bench-{i:06d}-{os.urandom(8).hex()}" for i in range(n)]
    con.execute("BEGIN")
    con.executemany(
        f"INSERT INTO api_keys ({', '.join(cols)}) "
        f"SELECT {', '.join(fresh.get(c, c) for c in cols)} FROM api_keys WHERE key_hash = ?",
        [
            tuple(
                {"id": f"key_bench{i:06d}", "key_hash": hashlib.sha256(k.encode()).hexdigest()}.get(
                    c, f"bench {i}"
                )
                for c in cols
                if c in fresh
            )
            + (src,)
            for i, k in enumerate(secrets_)
        ],
    )
    con.execute("COMMIT")
    con.close()
    return secrets_


def grow_backlog(db_path: Path, total: int) -> str:
    """Copy waiting task rows in SQL until `total` wait; returns the newest one's id."""
    con = sqlite3.connect(db_path)
    cols = [r[1] for r in con.execute("PRAGMA table_info(tasks)") if r[1] not in ("seq", "id")]
    template = con.execute(
        "SELECT id FROM tasks WHERE state = 'completed' ORDER BY seq LIMIT 1"
    ).fetchone()[0]
    waiting = con.execute("SELECT count(*) FROM tasks WHERE state = 'queued'").fetchone()[0]
    select_cols = ", ".join(
        {
            "state": "'queued'",
            "stage": "'queued'",
            "completed_at": "NULL",
            "expires_at": "NULL",
            "started_at": "NULL",
            "worker_id": "NULL",
            "step": "0",
        }.get(c, c)
        for c in cols
    )
    n = max(0, total - waiting)
    con.execute("BEGIN")
    con.executemany(
        f"INSERT INTO tasks (id, {', '.join(cols)}) "
        f"SELECT ?, {select_cols} FROM tasks WHERE id = ?",
        ((f"task_bench{waiting + i:012d}", template) for i in range(n)),
    )
    # The backlog belongs to a key that does not submit here (see clone_keys), but for its
    # newest task, which the poll benchmark reads with the seed's key.
    con.execute(
        "UPDATE tasks SET key_id = 'key_bench000000' WHERE id LIKE 'task_bench%' "
        "AND state = 'queued' AND seq < (SELECT max(seq) FROM tasks)"
    )
    con.execute("COMMIT")
    newest = con.execute(
        "SELECT id FROM tasks WHERE state = 'queued' ORDER BY seq DESC LIMIT 1"
    ).fetchone()[0]
    con.close()
    return str(newest)


def waiting_count(db_path: Path) -> int:
    con = sqlite3.connect(db_path)
    try:
        return int(con.execute("SELECT count(*) FROM tasks WHERE state = 'queued'").fetchone()[0])
    finally:
        con.close()


def wrk(
    url: str,
    *,
    seconds: float,
    connections: int,
    secret: str | list[str] | None,
    post: bool,
    cpu: str | None,
) -> dict[str, float]:
    lines = []
    if isinstance(secret, list):
        # One key a request, in turn (wrk calls request() for each one it sends).
        quoted = ", ".join(f'"{k}"' for k in secret)
        lines += [
            f"local keys = {{{quoted}}}",
            "local i = 0",
            "request = function()",
            "  i = i % #keys + 1",
            '  wrk.headers["Authorization"] = "Bearer " .. keys[i]',
            "  return wrk.format()",
            "end",
        ]
    elif secret:
        lines.append(f'wrk.headers["Authorization"] = "Bearer {secret}"')
    if post:
        body = SUBMIT_BODY.replace('"', '\\"')
        lines += [
            'wrk.method = "POST"',
            f'wrk.body = "{body}"',
            'wrk.headers["Content-Type"] = "application/json"',
        ]
    return _run_wrk("\n".join(lines) + "\n", url, seconds=seconds, connections=connections, cpu=cpu)


def _run_wrk(
    script: str, url: str, *, seconds: float, connections: int, cpu: str | None = None
) -> dict[str, float]:
    """wrk, one thread, with the Lua `script`, pinned to `cpu` if given; its figures."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{int(seconds)}s", "--latency", "-s", f.name, url]
    if cpu is not None:
        cmd = ["taskset", "-c", cpu, *cmd]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    os.unlink(f.name)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    lat = {m.group(1): _ms(m.group(2)) for m in re.finditer(r"^\s+(50|99)%\s+(\S+)", out, re.M)}
    return {
        "requests": requests,
        "errors": int(non2xx.group(1)) if non2xx else 0,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": lat.get("50", float("nan")),
        "p99_ms": lat.get("99", float("nan")),
    }


def hey_paced(
    url: str, *, rate: int, seconds: float, connections: int, secret: str
) -> dict[str, Any]:
    """`rate` requests/s held for `seconds` by hey (each of `connections` workers paced at
    rate/connections): the latency at that load, where wrk measures it at saturation."""
    per_worker = rate / connections
    cmd = ["hey", "-z", f"{int(seconds)}s", "-c", str(connections), "-q", f"{per_worker:.2f}"]
    cmd += ["-H", f"Authorization: Bearer {secret}", url]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    lat = {
        m.group(1): float(m.group(2)) * 1e3 for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)
    }
    codes = {
        m.group(1): int(m.group(2)) for m in re.finditer(r"\[(\d{3})\]\s+(\d+) responses", out)
    }
    total = sum(codes.values())
    return {
        "tool": "hey",
        "target_rps": rate,
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "requests": total,
        "errors": total - codes.get("200", 0),
        "p50_ms": round(lat.get("50", float("nan")), 2),
        "p99_ms": round(lat.get("99", float("nan")), 2),
    }


# wrk's Lua is LuaJIT: ffi reads the monotonic clock (wrk gives scripts none). Each request,
# on whichever connection frees first, takes the next slot of a global schedule; a slot already
# past is not caught up on.
PACE_LUA = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } pace_timespec;
int clock_gettime(int clk_id, pace_timespec *tp);
]]
local ts = ffi.new("pace_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval = 1000 / RATE
local slot = nil
delay = function()
  local now = now_ms()
  if slot == nil or slot + interval < now then slot = now else slot = slot + interval end
  return slot - now
end
wrk.headers["Authorization"] = "Bearer SECRET"
"""


def wrk_paced(
    url: str, *, rate: int, seconds: float, connections: int, secret: str
) -> dict[str, Any]:
    """`rate` requests/s held for `seconds` by wrk on `connections` connections (PACE_LUA): the
    latency at that load, where `wrk` measures it at saturation."""
    script = PACE_LUA.replace("RATE", str(rate)).replace("SECRET", secret)
    measured = _run_wrk(script, url, seconds=seconds, connections=connections)
    return {"tool": "wrk", "target_rps": rate, **measured}


def _ms(value: str) -> float:
    for unit, factor in (("us", 1e-3), ("ms", 1.0), ("s", 1e3)):
        if value.endswith(unit):
            return float(value[: -len(unit)]) * factor
    return float(value)


def measure(
    server: Server,
    path: str,
    args: argparse.Namespace,
    *,
    secret: str | list[str] | None,
    post: bool = False,
    connections: int = 4,
) -> dict[str, float]:
    before = server.cpu_s()
    run = wrk(
        server.base + path,
        seconds=args.seconds,
        connections=connections,
        secret=secret,
        post=post,
        cpu="1",
    )
    cpu = server.cpu_s() - before
    return {**run, "api_cpu_ms": 1000 * cpu / max(1, run["requests"])}


def cost_rounds(
    servers: list[Server],
    seeds: dict[str, dict[str, str]],
    queued: dict[str, str],
    args: argparse.Namespace,
    endpoints: list[str],
    submit_keys: dict[str, list[str]],
) -> dict[str, Any]:
    rows: dict[str, dict[str, list[dict[str, float]]]] = {
        s.name: {e: [] for e in endpoints} for s in servers
    }
    for _ in range(args.rounds):
        for endpoint in endpoints:
            for server in servers:
                sd = seeds[server.name]
                path, post = {
                    "healthz": ("/healthz", False),
                    "poll_completed": (f"/api/v1/tasks/{sd['done']}", False),
                    "account": ("/api/v1/account", False),
                    "poll_queued_newest": (f"/api/v1/tasks/{queued[server.name]}", False),
                    "submit": ("/api/v1/images/generations", True),
                }[endpoint]
                secret: str | list[str] | None = (
                    None
                    if endpoint == "healthz"
                    else submit_keys[server.name]
                    if post
                    else sd["secret"]
                )
                rows[server.name][endpoint].append(
                    measure(server, path, args, secret=secret, post=post)
                )
    out: dict[str, Any] = {}
    for name, per in rows.items():
        out[name] = {}
        for endpoint, runs in per.items():
            out[name][endpoint] = {
                "api_cpu_ms_median": round(statistics.median(r["api_cpu_ms"] for r in runs), 3),
                "api_cpu_ms_runs": [round(r["api_cpu_ms"], 3) for r in runs],
                "rps_median": round(statistics.median(r["rps"] for r in runs), 1),
                "errors": sum(int(r["errors"]) for r in runs),
            }
    return out


def main() -> int:
    args = parse_args()
    LOGS.mkdir(exist_ok=True)
    busy0, total0 = machine_cpu_s()
    started = time.monotonic()
    result: dict[str, Any] = {
        "bench": "request_cost",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": vars(args) | {"out": str(args.out) if args.out else None},
        "code": {
            "this": subprocess.run(
                ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
            ).stdout.strip()
            + "+tree",
            "baseline": args.baseline,
        },
        "notes": [
            "api_cpu_ms = server process CPU (user+system, all threads) / requests, wrk -t1 -c4 "
            "pinned to core 1, server pinned to core 0, SQLite, serve --workers 0.",
            "Designs interleaved per endpoint and round; medians over rounds.",
        ],
    }
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        tmpdir = Path(tmp)
        (tmpdir / "base").mkdir()
        base_src = export_tree(args.baseline, tmpdir / "base")
        (tmpdir / "this").mkdir()
        servers = [
            Server("baseline", base_src, tmpdir / "base", 18301),
            Server("this", ROOT / "src", tmpdir / "this", 18302),
        ]
        seeds = {s.name: seed(s) for s in servers}
        submit_keys = {
            s.name: clone_keys(s.db_path, seeds[s.name]["secret"], args.submit_keys + 1)[1:]
            for s in servers
        }
        for s in servers:
            stack.callback(s.stop)
        phases: dict[str, Any] = {}
        for label, size, endpoints in (
            ()
            if args.only_throughput
            else (
                (
                    "backlog_small",
                    args.backlog_small,
                    ["healthz", "poll_completed", "account", "poll_queued_newest", "submit"],
                ),
                (
                    "backlog_large",
                    args.backlog_large,
                    ["healthz", "poll_completed", "poll_queued_newest", "submit"],
                ),
            )
        ):
            queued = {s.name: grow_backlog(s.db_path, size) for s in servers}
            for s in servers:
                s.start(workers=0, cpu="0")
            waiting_before = {s.name: waiting_count(s.db_path) for s in servers}
            phases[label] = cost_rounds(servers, seeds, queued, args, endpoints, submit_keys)
            phases[label]["waiting_at_start"] = waiting_before
            phases[label]["waiting_at_end"] = {s.name: waiting_count(s.db_path) for s in servers}
            for s in servers:
                s.stop()
        result["phases"] = phases
        # Several HTTP processes on one port: throughput of polls of a finished task.
        this = servers[1]
        throughput: dict[str, Any] = {}
        for procs in () if args.only_cost else (1, 2):
            this.http_processes = procs
            this.start(workers=0, cpu=None)
            runs = []
            for _ in range(args.rounds):
                runs.append(
                    wrk(
                        f"{this.base}/api/v1/tasks/{seeds['this']['done']}",
                        seconds=args.seconds * 2,
                        connections=args.connections,
                        secret=seeds["this"]["secret"],
                        post=False,
                        cpu=None,
                    )
                )
            pacer = wrk_paced if args.paced_tool == "wrk" else hey_paced
            paced = [
                pacer(
                    f"{this.base}/api/v1/tasks/{seeds['this']['done']}",
                    rate=args.paced_rate,
                    seconds=args.seconds * 3,
                    connections=args.paced_connections,
                    secret=seeds["this"]["secret"],
                )
                for _ in range(args.rounds)
            ]
            this.stop()
            throughput[f"http_processes_{procs}"] = {
                "rps_median": round(statistics.median(r["rps"] for r in runs), 1),
                "p50_ms_median": round(statistics.median(r["p50_ms"] for r in runs), 2),
                "p99_ms_median": round(statistics.median(r["p99_ms"] for r in runs), 2),
                "errors": sum(int(r["errors"]) for r in runs),
                "runs": runs,
                "paced": {
                    "rps_median": round(statistics.median(r["rps"] for r in paced), 1),
                    "p50_ms_median": round(statistics.median(r["p50_ms"] for r in paced), 2),
                    "p99_ms_median": round(statistics.median(r["p99_ms"] for r in paced), 2),
                    "errors": sum(int(r["errors"]) for r in paced),
                    "runs": paced,
                },
            }
        result["poll_throughput"] = throughput
    busy1, total1 = machine_cpu_s()
    result["machine"]["busy_fraction_during_run"] = round((busy1 - busy0) / (total1 - total0), 3)
    result["wall_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
