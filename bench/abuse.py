"""Abuse scenarios against a real `serve`: what one key's abuse costs another key.

A `cogview-api serve --model test-echo` (SQLite in a temp folder; `--workers 0` but in the
flood, so tasks stay waiting) is started per scenario, with two funded keys: the
abuser A and the victim B. Each scenario is bounded in time and reports the victim's latency
(p50/p99) and refusals (any answer that is not 2xx), beside what the abuser got:

- `--flood`: A submits `--flood-total` (2,000) tasks as fast as `--flood-concurrency` connections
  go, while B submits at `--victim-rate` per second; one echo worker runs tasks (the fair claim
  serves B between A's), so B stays under its own waiting-task limit and any refusal it gets
  is A's doing. Targets: B 0 refusals, submit p99 <= 250 ms.
- `--streams`: A opens `--streams-count` (200) event streams on its waiting task and holds them;
  B polls its own task and its account at `--victim-rate` per second for `--seconds`.
  Target: B p99 <= 100 ms (refusals 0).
- `--slow-headers`: ten connections each send half of a 16 MiB header (8 MiB, no end) and hold;
  the server's resident memory (its process and children, /proc VmRSS) is sampled from idle to
  the peak. Target: growth within 50 MB of idle.

No flag: all three. The JSON goes to `--out` (default bench/results/abuse-<scenarios>.json).

    .venv/bin/python bench/abuse.py --out bench/results/abuse-main.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "cogview-4", "prompt": "a lighthouse at dusk", "size": "512x512"}
MIB = 1024 * 1024
SUBMIT_PATH = "/api/v1/images/generations"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--flood", action="store_true")
    p.add_argument("--streams", action="store_true")
    p.add_argument("--slow-headers", action="store_true")
    p.add_argument("--flood-total", type=int, default=2000)
    p.add_argument("--flood-concurrency", type=int, default=32)
    p.add_argument(
        "--flood-workers",
        type=int,
        default=1,
        help="in-process echo workers in --flood: the victim's tasks run, so its own waiting "
        "limit is not what refuses it",
    )
    p.add_argument("--streams-count", type=int, default=200)
    p.add_argument("--victim-rate", type=float, default=10.0, help="victim requests per second")
    p.add_argument("--seconds", type=float, default=15.0, help="victim's run in --streams")
    p.add_argument("--timeout", type=float, default=120.0, help="bound of each scenario")
    p.add_argument(
        "--src", type=Path, default=ROOT / "src", help="the src tree to serve (default: this one)"
    )
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    if not (args.flood or args.streams or args.slow_headers):
        args.flood = args.streams = args.slow_headers = True
    return args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`serve` (test-echo engine) on a fresh SQLite database in `workdir`."""

    def __init__(self, workdir: Path, src: Path, **env: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = workdir / "serve.log"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(src),
            "COGVIEW_DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite'}",
            "COGVIEW_STORAGE_URL": f"file://{workdir / 'images'}",
            "COGVIEW_MODEL": "test-echo",
            "COGVIEW_LOG_LEVEL": "warning",
            "COGVIEW_PUBLIC_URL": self.base,
            **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str) -> str:
        return subprocess.run(
            [sys.executable, "-c", "from cogview_api.cli import main; raise SystemExit(main())"]
            + list(args),
            env=self.env,
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def key(self, name: str) -> str:
        out = self.cli("keys", "create", "--name", name, "--credits", "100000000", "--json")
        return str(json.loads(out)["key"])

    def start(self, workers: int = 0) -> None:
        self.cli("migrate")
        cmd = [sys.executable, "-c", "from cogview_api.cli import main; raise SystemExit(main())"]
        cmd += ["serve", "--port", str(self.port), "--workers", str(workers)]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.base + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"serve did not start; see {self.log}")

    def rss_mb(self) -> float:
        """Resident memory of the server and its children, MB."""
        assert self.proc is not None
        kids = subprocess.run(
            ["pgrep", "-P", str(self.proc.pid)], capture_output=True, text=True
        ).stdout.split()
        total = 0
        for pid in [self.proc.pid, *map(int, kids)]:
            try:
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except FileNotFoundError:
                pass
        return total / 1024

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None


def summary(latencies_s: list[float], codes: list[int]) -> dict[str, Any]:
    ms = sorted(x * 1000 for x in latencies_s)

    def pct(p: float) -> float | None:
        if not ms:
            return None
        return round(ms[min(len(ms) - 1, int(p * len(ms)))], 2)

    refused: dict[str, int] = {}
    for c in codes:
        if not 200 <= c < 300:
            refused[str(c)] = refused.get(str(c), 0) + 1
    return {
        "requests": len(codes),
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
        "max_ms": round(ms[-1], 2) if ms else None,
        "mean_ms": round(statistics.fmean(ms), 2) if ms else None,
        "refusals": sum(refused.values()),
        "refusals_by_status": refused,
    }


# A few refusals' answers of each status, to tell whose limit refused (status 0: no answer).
REFUSALS: dict[str, list[str]] = {}


async def timed(
    client: httpx.AsyncClient, method: str, url: str, who: str = "abuser", **kw: Any
) -> tuple[float, int]:
    t0 = time.perf_counter()
    try:
        r = await client.request(method, url, **kw)
        code, text = r.status_code, r.text[:300]
    except httpx.HTTPError as exc:
        code, text = 0, repr(exc)[:300]  # no answer: a refusal too
    if not 200 <= code < 300:
        seen = REFUSALS.setdefault(f"{who} {code}", [])
        if len(seen) < 3:
            seen.append(f"{method} {url}: {text}")
    return time.perf_counter() - t0, code


async def victim(
    base: str, key: str, rate: float, stop: asyncio.Event, requests: list[tuple[str, str, Any]]
) -> tuple[list[float], list[int]]:
    """Requests in turn at `rate` per second (each its own task, so a slow one does not delay
    the schedule) until `stop`."""
    lat: list[float] = []
    codes: list[int] = []
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:

        async def one(method: str, url: str, body: Any) -> None:
            t, c = await timed(client, method, url, "victim", json=body)
            lat.append(t)
            codes.append(c)

        pending: list[asyncio.Task[None]] = []
        i = 0
        while not stop.is_set():
            method, url, body = requests[i % len(requests)]
            pending.append(asyncio.create_task(one(method, url, body)))
            i += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1 / rate)
        await asyncio.gather(*pending)
    return lat, codes


async def flood(server: Server, a: str, b: str, args: argparse.Namespace) -> dict[str, Any]:
    lat_a: list[float] = []
    codes_a: list[int] = []
    stop = asyncio.Event()
    left = args.flood_total
    headers = {"Authorization": f"Bearer {a}"}

    async def submitter(client: httpx.AsyncClient) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            t, c = await timed(client, "POST", "/api/v1/images/generations", json=BODY)
            lat_a.append(t)
            codes_a.append(c)

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=args.flood_concurrency)
    async with httpx.AsyncClient(
        base_url=server.base, headers=headers, timeout=30, limits=limits
    ) as client:
        victim_run = asyncio.create_task(
            victim(server.base, b, args.victim_rate, stop, [("POST", SUBMIT_PATH, BODY)])
        )
        flooders = [submitter(client) for _ in range(args.flood_concurrency)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*flooders), timeout=args.timeout)
        stop.set()
        lat_b, codes_b = await victim_run
    elapsed = time.perf_counter() - t0
    b_sum = summary(lat_b, codes_b)
    return {
        "abuser": {**summary(lat_a, codes_a), "per_second": round(len(codes_a) / elapsed, 1)},
        "victim_submits": b_sum,
        "seconds": round(elapsed, 2),
        "targets": {"victim_refusals": 0, "victim_p99_ms": 250},
        "met": b_sum["refusals"] == 0 and (b_sum["p99_ms"] or 1e9) <= 250,
    }


async def streams(server: Server, a: str, b: str, args: argparse.Namespace) -> dict[str, Any]:
    auth_a = {"Authorization": f"Bearer {a}"}
    async with httpx.AsyncClient(base_url=server.base, timeout=30) as c:
        task_a = (await c.post("/api/v1/images/generations", json=BODY, headers=auth_a)).json()
        task_b = (
            await c.post(
                "/api/v1/images/generations",
                json=BODY,
                headers={"Authorization": f"Bearer {b}"},
            )
        ).json()
    a_id, b_id = task_a["data"]["task_id"], task_b["data"]["task_id"]
    opened: list[int] = []
    hold = asyncio.Event()
    limits = httpx.Limits(max_connections=args.streams_count + 10)
    async with httpx.AsyncClient(
        base_url=server.base, headers=auth_a, timeout=httpx.Timeout(30, read=None), limits=limits
    ) as sc:

        async def one_stream() -> None:
            try:
                async with sc.stream("GET", f"/api/v1/tasks/{a_id}/events") as r:
                    opened.append(r.status_code)
                    if r.status_code == 200:
                        reader = r.aiter_bytes()
                        while not hold.is_set():
                            try:
                                await asyncio.wait_for(anext(reader), timeout=0.5)
                            except TimeoutError:
                                continue
                            except StopAsyncIteration:
                                return
            except httpx.HTTPError:
                opened.append(0)

        holders = [asyncio.create_task(one_stream()) for _ in range(args.streams_count)]
        deadline = time.monotonic() + min(30, args.timeout)
        while len(opened) < args.streams_count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(args.seconds, stop.set)
        lat_b, codes_b = await victim(
            server.base,
            b,
            args.victim_rate,
            stop,
            [("GET", f"/api/v1/tasks/{b_id}", None), ("GET", "/api/v1/account", None)],
        )
        hold.set()
        await asyncio.wait(holders, timeout=10)
        for h in holders:
            h.cancel()
    b_sum = summary(lat_b, codes_b)
    return {
        "streams_asked": args.streams_count,
        "streams_open": sum(1 for c in opened if c == 200),
        "streams_refused_by_status": {
            str(c): opened.count(c) for c in sorted(set(opened)) if c != 200
        },
        "victim_reads": b_sum,
        "targets": {"victim_refusals": 0, "victim_p99_ms": 100},
        "met": b_sum["refusals"] == 0 and (b_sum["p99_ms"] or 1e9) <= 100,
    }


def slow_headers(server: Server, args: argparse.Namespace) -> dict[str, Any]:
    """Ten sockets each send 8 MiB of one header line and hold; RSS sampled throughout."""
    time.sleep(1)
    idle = server.rss_mb()
    peak = idle
    stop = threading.Event()
    sent: list[int] = [0] * 10
    ended: list[str] = [""] * 10

    def attacker(i: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: ")
                chunk = b"a" * 65536
                while sent[i] < 8 * MIB and not stop.is_set():
                    s.sendall(chunk)
                    sent[i] += len(chunk)
                ended[i] = "held"
                stop.wait(timeout=args.timeout)
        except OSError as exc:  # the server closed it: what a limit does
            ended[i] = type(exc).__name__

    threads = [threading.Thread(target=attacker, args=(i,), daemon=True) for i in range(10)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + min(args.timeout, 30)
    while time.monotonic() < deadline:
        peak = max(peak, server.rss_mb())
        if all(ended):
            break
        time.sleep(0.1)
    for _ in range(20):  # a little longer: what the server holds once the bytes are in
        peak = max(peak, server.rss_mb())
        time.sleep(0.1)
    healthy = None
    try:
        healthy = httpx.get(server.base + "/healthz", timeout=5).status_code
    except httpx.HTTPError:
        healthy = 0
    stop.set()
    for t in threads:
        t.join(timeout=5)
    return {
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
        "growth_mb": round(peak - idle, 1),
        "bytes_sent_mib": [round(x / MIB, 2) for x in sent],
        "connections": ended,
        "healthz_during": healthy,
        "targets": {"growth_mb": 50},
        "met": peak - idle <= 50,
    }


def run_scenario(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"abuse-{name}-") as tmp:
        server = Server(Path(tmp), args.src)
        a, b = server.key("abuser"), server.key("victim")
        server.start(workers=args.flood_workers if name == "flood" else 0)
        try:
            REFUSALS.clear()
            if name == "flood":
                found = asyncio.run(flood(server, a, b, args))
            elif name == "streams":
                found = asyncio.run(streams(server, a, b, args))
            else:
                found = slow_headers(server, args)
            found["refusal_samples"] = dict(REFUSALS)
            return found
        finally:
            server.stop()


def main() -> int:
    args = parse_args()
    flags = {"flood": args.flood, "streams": args.streams, "slow_headers": args.slow_headers}
    chosen = [name for name, on in flags.items() if on]
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    result: dict[str, Any] = {
        "bench": "abuse",
        "commit": commit,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "scenarios": {},
    }
    for name in chosen:
        print(f"abuse: {name} ...", flush=True)
        result["scenarios"][name] = run_scenario(name, args)
        print(json.dumps(result["scenarios"][name], indent=1), flush=True)
    out = args.out or ROOT / "bench" / "results" / f"abuse-{'-'.join(chosen)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
