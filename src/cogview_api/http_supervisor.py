"""`serve --http-processes N`: uvicorn's own supervisor, with one listening socket per process.

uvicorn's `Multiprocess` hands every process the same listening socket. asyncio's accept loop
then takes every connection that is waiting when its process wakes, so connections opened
together (a proxy's keep-alive pool, a load test's connections) can all land in one process and
stay there while the others idle (2 processes, 40 bursts of 16 connections: the smaller share
was 2-3 at the median and 0 twice; wrk's paced polls fell to one process's rate in one round of
four or five, bench/README.md). Here each process gets its own socket, bound to the same address
with `SO_REUSEPORT`, and the kernel spreads new connections over them by their addresses (the
same bursts: 7 at the median, never under 4). A process that dies is replaced on its own socket
(connections that arrive meanwhile wait in that socket's backlog); everything else (health
pings, restart on SIGHUP, stop on SIGINT/SIGTERM) is uvicorn's.
"""

from __future__ import annotations

import logging
import socket

from uvicorn.config import STARTUP_FAILURE, Config
from uvicorn.supervisors.multiprocess import Multiprocess, Process

log = logging.getLogger(__name__)


def bind_sockets(host: str, port: int, n: int) -> list[socket.socket]:
    """`n` listening sockets on one address, each with SO_REUSEPORT (port 0: the first one's)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(n):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.set_inheritable(True)
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class SpreadMultiprocess(Multiprocess):
    """uvicorn's `Multiprocess` with process i on `sockets[i]` (one per process)."""

    def __init__(self, config: Config, sockets: list[socket.socket]) -> None:
        super().__init__(config, sockets)
        assert len(sockets) == self.processes_num

    def _process(self, index: int) -> Process:
        process = Process(self.config, [self.sockets[index]])
        process.start()
        return process

    def init_processes(self) -> None:
        self.processes = [self._process(i) for i in range(self.processes_num)]

    def restart_all(self) -> None:
        """SIGHUP: each process replaced by a new one on its socket, the new one ready first."""
        for index, old in enumerate(self.processes):
            if self.should_exit.is_set():
                return
            new = self._process(index)
            if not new.wait_until_ready(self.config.timeout_worker_healthcheck, self.should_exit):
                new.kill()
                new.join()
                if not self.should_exit.is_set():
                    log.error("HTTP process %s was not ready in time; restart aborted", new.pid)
                return
            old.terminate()
            old.join()
            self.processes[index] = new

    def keep_subprocess_alive(self) -> None:
        if self.should_exit.is_set():
            return
        for index, process in enumerate(self.processes):
            if process.is_alive(timeout=self.config.timeout_worker_healthcheck):
                continue
            process.kill()  # hung: gone for good
            process.join()
            if process.exitcode == STARTUP_FAILURE:
                # It failed before serving (the app, the socket): a new one would fail alike.
                log.error("HTTP process %s failed to start; stopping", process.pid)
                self.should_exit.set()
                return
            if self.should_exit.is_set():
                return
            log.info("HTTP process %s died; starting another on its socket", process.pid)
            self.processes[index] = self._process(index)
