"""`serve --http-processes 2` spreads connections over its processes (http_supervisor.py: a
SO_REUSEPORT socket per process). With one socket shared, the process that woke first took
most of a burst of connections: over 40 bursts of 16, the smaller share was 2-3 at the median
and 0 twice; with a socket each, 7 at the median and never under 4."""

from __future__ import annotations

import os
import socket
import statistics
import time
from pathlib import Path

from tests.support import ServerProcess, server_env

BURSTS = 10
CONNECTIONS = 16


def children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:  # closed meanwhile
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_inodes(port: int, state: str) -> set[int]:
    """Inodes of this machine's IPv4 TCP sockets on local `port` in `state` (01 established,
    0A listening), from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        if local_port == port and fields[3] == state:
            found.add(int(fields[9]))
    return found


def http_processes(server: ServerProcess) -> list[int]:
    """The serve process's children that hold a listening socket on its port, once both do."""
    assert server.proc is not None
    deadline = time.monotonic() + 30
    while True:  # a socket is listening once its process has started serving
        listening = tcp_inodes(server.port, "0A")
        found = [p for p in children(server.proc.pid) if socket_inodes(p) & listening]
        if len(found) == 2 or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def smaller_share(server: ServerProcess, pids: list[int]) -> int:
    """Open CONNECTIONS connections at once, one request on each (so each is accepted and
    served), and count how many the less-loaded process holds."""
    connections = [
        socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(CONNECTIONS)
    ]
    try:
        for c in connections:
            c.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert c.recv(4096).startswith(b"HTTP/1.1 200")
        established = tcp_inodes(server.port, "01")
        shares = [len(socket_inodes(p) & established) for p in pids]
        assert sum(shares) == CONNECTIONS
        return min(shares)
    finally:
        for c in connections:
            c.close()


def test_bursts_of_connections_spread_over_the_http_processes(
    tmp_path: Path, tiny_cache: Path
) -> None:
    env = server_env(tiny_cache, {"COGVIEW_MODEL": "test-echo"})
    args = ("--workers", "0", "--http-processes", "2")
    with ServerProcess(workdir=tmp_path, env=env, args=args).start(wait_ready=False) as server:
        pids = http_processes(server)
        assert len(pids) == 2
        time.sleep(0.5)  # past their application startup, into their accept loops
        shares = [smaller_share(server, pids) for _ in range(BURSTS)]
    assert statistics.median(shares) >= 5, shares
