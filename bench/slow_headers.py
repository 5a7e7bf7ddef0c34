"""The header attack of issue 11 against a real server: its memory under ten half-sent 16 MiB
headers, and the answer to one 32 MiB header.

Starts `serve --workers 0 --model test-echo` on SQLite from this tree (or `--ref`, a git ref,
for the before figure), measures its resident memory idle, then opens ten connections that
each send a request line and up to 16 MiB of one header, never finishing it, and samples the
server's memory while they send and hold; then sends one 32 MiB header and records the status.
Bounded in time; writes JSON to bench/results/slow_headers-<label>.json.

    .venv/bin/python bench/slow_headers.py            # this tree
    .venv/bin/python bench/slow_headers.py --ref HEAD~1 --label before
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import request_cost as rc  # noqa: E402

MIB = 1024 * 1024
RESULTS = Path(__file__).parent / "results"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def half_sent_header(port: int, size: int, hold_s: float, refused: list[bool]) -> None:
    """Send a request line and `size` bytes of one header; never end it; hold `hold_s`."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(hold_s)
    try:
        sock.sendall(b"GET /api/v1/account HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        chunk, sent = b"a" * 65536, 0
        while sent < size:
            if select.select([sock], [], [], 0)[0]:
                refused.append(True)  # answered (431) or closed by the server
                return
            try:
                sent += sock.send(chunk)
            except OSError:
                refused.append(True)
                return
        time.sleep(hold_s)
        refused.append(False)
    finally:
        sock.close()


def one_big_header(port: int, size: int) -> str:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.settimeout(30)
    try:
        sock.sendall(b"GET /api/v1/account HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
        sent, chunk = 0, b"a" * 65536
        while sent < size and not select.select([sock], [], [], 0)[0]:
            try:
                sent += sock.send(chunk)
            except OSError:
                break
        else:
            if sent >= size:
                sock.sendall(b"\r\n\r\n")
        try:
            first = sock.recv(4096).split(b"\r\n", 1)[0].decode("latin-1")
        except OSError as exc:
            return f"no answer ({exc.__class__.__name__})"
        return first or "closed without an answer"
    finally:
        sock.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ref", help="git ref to measure instead of this tree")
    p.add_argument("--label", default="this")
    p.add_argument("--connections", type=int, default=10)
    p.add_argument("--hold", type=float, default=5.0, help="seconds each connection holds")
    args = p.parse_args()
    rc.LOGS.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        src = rc.export_tree(args.ref, t) if args.ref else rc.ROOT / "src"
        server = rc.Server(args.label, src, t, 18431)
        server.start(workers=0, cpu=None)
        try:
            assert server.proc is not None
            pid = server.proc.pid
            time.sleep(1.0)
            idle = rss_mb(pid)
            refused: list[bool] = []
            threads = [
                threading.Thread(
                    target=half_sent_header, args=(server.port, 16 * MIB, args.hold, refused)
                )
                for _ in range(args.connections)
            ]
            for th in threads:
                th.start()
            peak = idle
            while any(th.is_alive() for th in threads):
                peak = max(peak, rss_mb(pid))
                time.sleep(0.05)
            after = rss_mb(pid)
            big = one_big_header(server.port, 32 * MIB)
        finally:
            server.stop()
    out = {
        "ref": args.ref or "working tree",
        "idle_rss_mb": round(idle, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_over_idle_mb": round(peak - idle, 1),
        "after_rss_mb": round(after, 1),
        "half_sent_16mib_connections": args.connections,
        "refused_by_server": sum(refused),
        "answer_to_32mib_header": big,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"slow_headers-{args.label}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
