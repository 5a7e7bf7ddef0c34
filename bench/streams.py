"""The stream storm (issue 11, finding 3): while one key holds many event streams open, what
another key's poll and submit cost.

`cogview-api serve --workers 0 --model test-echo` runs as a subprocess on a fresh SQLite
database (so the tasks stay queued and the streams stay open and idle). Key A submits 100
tasks and opens `--streams` event streams over them, from a separate
process (asyncio + httpx). Key B then, for `--seconds`, alternates a poll
(`GET /api/v1/tasks/{id}`) and a submit (`POST /api/v1/images/generations`; they pile up in the
queue, whose limits and the submit rate limit are lifted for this), one at a time, and
the script reports B's latency p50/p99 for each, with no streams open (`idle`) and with them
(`storm`). `--src` runs another checkout's code (e.g. `main` exported with `git archive`), for
the before/after.

    .venv/bin/python bench/streams.py --out bench/results/streams-after.json
    git archive main src | tar -x -C /tmp/main
    .venv/bin/python bench/streams.py --src /tmp/main/src --out bench/results/streams-before.json

Target: B's p99 <= 100 ms with 200 streams open.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BODY = {"model": "cogview-4", "prompt": "a lighthouse at dusk", "size": "1024*1024"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--streams", type=int, default=200)
    p.add_argument("--seconds", type=float, default=15.0, help="per phase (default 15)")
    p.add_argument("--src", default=str(ROOT / "src"), help="the code to serve")
    p.add_argument(
        "--max-streams",
        type=int,
        default=1000,
        help="COGVIEW_MAX_STREAMS_PER_KEY (default 1000: all streams open; 20 is the default)",
    )
    p.add_argument("--out", help="also write the JSON here")
    p.add_argument("--stream-child", nargs=3, help=argparse.SUPPRESS)
    return p.parse_args()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(src: str, workdir: Path, max_streams: int) -> Any:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
    env.update(
        PYTHONPATH=src,
        COGVIEW_DATABASE_URL=f"sqlite:///{workdir}/cogview.db",
        COGVIEW_STORAGE_URL=f"file://{workdir}/images",
        COGVIEW_LOG_LEVEL="warning",
        COGVIEW_MAX_STREAMS_PER_KEY=str(max_streams),
        # B's submits pile up (no worker): room for all of them.
        COGVIEW_MAX_WAITING_PER_KEY="100000",
        COGVIEW_MAX_QUEUE="100000",
        COGVIEW_SUBMIT_RATE="0",  # no submit rate limit: B's submits are all real ones
    )
    cli = [sys.executable, "-m", "cogview_api.cli"]
    log = open(workdir / "serve.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [*cli, "serve", "--port", str(port), "--workers", "0", "--model", "test-echo"],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError((workdir / "serve.log").read_text()[-3000:])
            time.sleep(0.2)

        def key(name: str) -> str:
            out = subprocess.run(
                [*cli, "keys", "create", "--name", name, "--credits", "1000000", "--json"],
                cwd=workdir,
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            return str(json.loads(out.stdout)["key"])

        yield base, key, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


async def hold_streams(base: str, key: str, task_ids: list[str], count: int) -> None:
    """Open `count` streams over the tasks; print how many opened, then hold them."""
    headers = {"Authorization": f"Bearer {key}"}
    limits = httpx.Limits(max_connections=count + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=None, limits=limits) as c:
        opened = refused = 0

        async def one(i: int) -> None:
            nonlocal opened, refused
            path = f"/api/v1/tasks/{task_ids[i % len(task_ids)]}/events"
            async with c.stream("GET", path, headers=headers) as r:
                if r.status_code != 200:
                    refused += 1
                    return
                first = True
                async for _ in r.aiter_lines():  # read all along, as a client does
                    if first:
                        opened += 1
                        first = False

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        while opened + refused < count:
            await asyncio.sleep(0.05)
        print(json.dumps({"opened": opened, "refused": refused}), flush=True)
        await asyncio.gather(*tasks)


def victim(base: str, key: str, seconds: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"}
    polls: list[float] = []
    submits: list[float] = []
    errors: dict[str, int] = {}
    with httpx.Client(base_url=base, timeout=30, headers=headers) as c:
        task_id = c.post("/api/v1/images/generations", json=BODY).json()["data"]["task_id"]
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            r = c.get(f"/api/v1/tasks/{task_id}")
            polls.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors[f"poll {r.status_code}"] = errors.get(f"poll {r.status_code}", 0) + 1
            t = time.perf_counter()
            r = c.post("/api/v1/images/generations", json=BODY)
            submits.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors[f"submit {r.status_code}"] = errors.get(f"submit {r.status_code}", 0) + 1
    return {"poll": summary(polls), "submit": summary(submits), "errors": errors}


def summary(xs: list[float]) -> dict[str, float | int]:
    xs = sorted(xs)
    return {
        "n": len(xs),
        "p50_ms": round(statistics.median(xs) * 1000, 2),
        "p99_ms": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1000, 2),
        "max_ms": round(xs[-1] * 1000, 2),
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    args = parse_args()
    if args.stream_child:
        base, key, ids = args.stream_child
        asyncio.run(hold_streams(base, key, ids.split(","), args.streams))
        return
    src = str(Path(args.src).resolve())
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp, server(src, Path(tmp), args.max_streams) as run:
        base, make_key, pid = run
        a, b = make_key("storm"), make_key("victim")
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {a}"}) as c:
            ids = []
            for _ in range(min(100, args.streams)):
                r = c.post("/api/v1/images/generations", json=BODY)
                if r.status_code != 200:
                    break
                ids.append(r.json()["data"]["task_id"])
        idle = victim(base, b, args.seconds)
        child = subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--streams",
                str(args.streams),
                "--stream-child",
                base,
                a,
                ",".join(ids),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            opened = json.loads(child.stdout.readline())
            time.sleep(1.0)  # the opening burst is over
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(3.0)
            server_cpu_idle_streams = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            storm = victim(base, b, args.seconds)
        finally:
            child.terminate()
            child.wait(timeout=20)
    result = {
        "bench": "streams",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu_count": os.cpu_count(), "python": platform.python_version()},
        "code": {"src": src, "bench_commit": commit},
        "settings": {
            "streams": args.streams,
            "tasks_streamed": len(ids),
            "seconds_per_phase": args.seconds,
            "max_streams_per_key": args.max_streams,
            "database": "sqlite",
            "workers": 0,
        },
        "streams": opened,
        "server_cpu_share_while_streams_idle": round(server_cpu_idle_streams, 3),
        "victim_idle": idle,
        "victim_storm": storm,
        "target": "victim_storm poll and submit p99 <= 100 ms",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
