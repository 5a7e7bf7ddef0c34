"""The request id's cost: RequestGuard (the middleware every request passes) of a git ref
against this tree's, in one process, on a trivial app, so only the middleware differs.

`request_ab.py` measures a whole poll through uvicorn and the database (about 1 ms of CPU),
where a change of a microsecond drowns in the run-to-run spread of a shared machine; this
measures the middleware alone: CPU microseconds per request, interleaved rounds, a poll's
headers (Host, Authorization, Accept) with and without an incoming X-Request-ID.

    .venv/bin/python bench/request_guard_ab.py d5b1bc0 --out bench/results/request_guard_ab-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cogview_api.api import errors as this_errors

ROOT = Path(__file__).resolve().parents[1]
HEADERS = [(b"host", b"127.0.0.1:8000"), (b"authorization", b"Bearer cv4_x"), (b"accept", b"*/*")]
Asgi = Callable[..., Awaitable[None]]


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"{}"})


async def _send(message: Any) -> None:
    return None


async def _receive() -> Any:
    return {"type": "http.request", "body": b""}


def _guard_of(ref: str, into: Path) -> Any:
    """RequestGuard from `api/errors.py` at `ref` (it imports only leaves of this tree)."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{ref}:src/cogview_api/api/errors.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = into / "base_errors.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("base_errors", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RequestGuard


async def _us_per_request(guard: Asgi, headers: list[tuple[bytes, bytes]], n: int) -> float:
    started = time.process_time()
    for _ in range(n):
        scope = {"type": "http", "method": "GET", "path": "/api/v1/tasks/x", "headers": headers}
        await guard(scope, _receive, _send)
    return (time.process_time() - started) / n * 1e6


async def _measure(base_cls: Any, rounds: int, n: int) -> dict[str, Any]:
    hosts = frozenset({"127.0.0.1", "localhost"})
    guards = {
        "base": base_cls(_app, max_body_bytes=65536, allowed_hosts=hosts),
        "this": this_errors.RequestGuard(_app, max_body_bytes=65536, allowed_hosts=hosts),
    }
    cases = {"poll": HEADERS, "poll_with_x_request_id": [*HEADERS, (b"x-request-id", b"a" * 36)]}
    out: dict[str, Any] = {}
    for case, headers in cases.items():
        runs: dict[str, list[float]] = {"base": [], "this": []}
        for r in range(rounds):
            order = ["base", "this"] if r % 2 else ["this", "base"]
            for name in order:
                runs[name].append(round(await _us_per_request(guards[name], headers, n), 3))
        out[case] = {
            name: {"cpu_us_median": statistics.median(v), "cpu_us_runs": v}
            for name, v in runs.items()
        }
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ref", help="git ref to compare against")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--requests", type=int, default=50_000, help="per round and side")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base_cls = _guard_of(args.ref, Path(tmp))
        results = asyncio.run(_measure(base_cls, args.rounds, args.requests))
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    report = {
        "benchmark": "request_guard_ab",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
        "base_ref": args.ref,
        "this_commit": head,
        "requests_per_round": args.requests,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
