"""Test support: real servers on free loopback ports, in a thread or as a subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from fastapi import FastAPI
from PIL import Image
from sqlalchemy import event

from cogview_api.api.app import create_app
from cogview_api.api.http_server import http_config
from cogview_api.config import Settings
from cogview_api.engine import EngineJob, PreviewFn, ProgressFn
from cogview_api.errors import EngineOutOfMemory
from cogview_api.services import keys as key_service
from cogview_api.services.backends import Backends
from cogview_api.storage import open_storage
from cogview_api.store.db import Database
from cogview_api.worker.loop import Worker

# Small enough for a 2-core CPU; these are settings, not special code paths.
TEST_ENV = {
    "COGVIEW_STEPS_HD": "2",
    "COGVIEW_STEPS_STANDARD": "1",
    "COGVIEW_STEPS_LOW": "1",
    "COGVIEW_POLL_INTERVAL": "0.1",
    "COGVIEW_LOG_LEVEL": "warning",
    # The subprocess's own folder (its cwd), as the tests read the files there; the default
    # is the user's data folder.
    "COGVIEW_DATA_DIR": "cogview-data",
}

EXAMPLE_BODY = {
    "model": "cogview-4",
    "prompt": "A futuristic robot assistant helping in a modern kitchen, clean design",
    "size": "1024*1024",
    "quality": "hd",
}

CLI = [sys.executable, "-m", "cogview_api.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- in-process server (api tier) ------------------------------------------------------------


@dataclass
class InProcessApi:
    base_url: str
    settings: Settings
    db: Database
    client: httpx.Client
    app: FastAPI

    def make_key(self, credits: int = 100, name: str = "test") -> str:
        _, secret = key_service.create_key(self.db, name=name, credits=credits)
        return secret


class QuickServer(uvicorn.Server):
    """uvicorn's server with its two fixed 0.1 s pauses shortened, for tests: its main loop's
    tick (how soon `should_exit` is seen) and the pause after it asks open connections to
    close. A test's server then stops in milliseconds, not ~150 ms: over the ~800 tests of the
    api tier, about a minute of the suite's wall time."""

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            await asyncio.sleep(0.005)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + 10
        while self.server_state.tasks and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for task in self.server_state.tasks:
            task.cancel()
        await self.lifespan.shutdown()


@contextmanager
def in_process_api(settings: Settings) -> Iterator[InProcessApi]:
    """The app from the factory behind a real uvicorn on a free port, in a thread."""
    db = Database(settings.database_url)
    db.migrate()
    app = create_app(settings, backends=Backends.open(settings, db=db))
    port = free_port()
    config = http_config(app, settings, host="127.0.0.1", port=port, log_level="warning")
    server = QuickServer(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("in-process server did not start")
        time.sleep(0.005)
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as client:
        try:
            yield InProcessApi(base_url=base, settings=settings, db=db, client=client, app=app)
        finally:
            server.should_exit = True
            thread.join(timeout=10)
            db.dispose()


# -- subprocess server (e2e tier) ------------------------------------------------------------


@dataclass
class ServerProcess:
    """`cogview-api serve` as a real subprocess, with its own data folder. Without `args` it
    runs the model its env names (COGVIEW_MODEL), else the tiny one. As a context manager
    (`with server.start() as proc:`) it is stopped on the way out."""

    workdir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    args: tuple[str, ...] | None = None
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        if self.args is None:
            self.args = () if "COGVIEW_MODEL" in self.env else ("--model", "tiny")

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*CLI, *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
        )

    @property
    def database_url(self) -> str:
        """The server's database, as its settings resolve it from its environment and folder."""
        data_dir = self.workdir / self.env.get("COGVIEW_DATA_DIR", "cogview-data")
        url = self.env.get("COGVIEW_DATABASE_URL", "")
        return Settings(data_dir=data_dir, database_url=url).database_url

    def make_key(self, credits: int = 1000, name: str = "e2e") -> dict[str, Any]:
        """A key in the server's database, made in this process with the services that
        `keys create --json` calls, and its fields (test_cli.py runs the command itself): a
        CLI subprocess per key cost ~0.8 s of interpreter start and imports, 43 times."""
        db = Database(self.database_url)
        try:
            db.migrate()  # a no-op once the server has started; a key may come first
            key, secret = key_service.create_key(db, name=name, credits=credits)
            signing = key_service.webhook_secret(db, key.id)
        finally:
            db.dispose()
        return {
            "id": key.id,
            "name": key.name,
            "balance": key.balance,
            "key": secret,
            "webhook_secret": signing,
        }

    def start(self, wait_ready: bool = True, timeout: float = 120) -> ServerProcess:
        """Start (or, after `kill`, start again) the server; returns once it answers. The child
        writes its log to the file: this process keeps no handle open past the start."""
        with open(self.workdir / f"serve-{self.port}.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "--port", str(self.port), *(self.args or ())],
                cwd=self.workdir,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        path = "/readyz" if wait_ready else "/healthz"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.read_log()}")
            try:
                if httpx.get(self.base_url + path, timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"server not ready in {timeout}s: {self.read_log()}")

    def read_log(self) -> str:
        return (self.workdir / f"serve-{self.port}.log").read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, like a crashed machine."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def server_env(cache_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("COGVIEW_")}
    env.update(TEST_ENV)
    env["COGVIEW_CACHE_DIR"] = str(cache_dir)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra or {})
    return env


def poll_until_done(
    client: httpx.Client, task_id: str, key: str, timeout: float = 120
) -> dict[str, Any]:
    """Poll like a client of the hosted API: `data.status` until COMPLETED or FAILED."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = client.get(f"/api/v1/tasks/{task_id}", headers=auth(key))
        r.raise_for_status()
        data: dict[str, Any] = r.json()["data"]
        if data["status"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return data
        time.sleep(0.2)
    raise TimeoutError(f"task {task_id} not finished in {timeout}s")


def sse_items(response: httpx.Response) -> Iterator[tuple[str, Any]]:
    """A `text/event-stream` as it arrives: `("comment", text)` for each comment line and
    `(event name, parsed JSON data)` for each frame. Ends when the server closes the stream."""
    event, data = "message", list[str]()
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)


def copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, dirs_exist_ok=True)


def submit_task(client: httpx.Client, key: str, **changes: Any) -> str:
    """Submit the example body with `changes`; the new task's id."""
    r = client.post(
        "/api/v1/images/generations", json={**EXAMPLE_BODY, **changes}, headers=auth(key)
    )
    assert r.status_code == 200, r.text
    assert r.json()["data"]["status"] == "IN_PROGRESS"
    return str(r.json()["data"]["task_id"])


class FlakyEngine:
    """An Engine stand-in: runs out of memory on prompts containing 'oom', draws a gray
    image otherwise. Exercises the worker's failure path without a GPU."""

    name = "flaky"
    device = "cpu"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def generate(
        self, jobs: Sequence[EngineJob], progress: ProgressFn, preview: PreviewFn | None = None
    ) -> list[list[Image.Image]]:
        out = []
        for job in jobs:
            self.calls.append(job.task_id)
            if "oom" in job.prompt:
                raise EngineOutOfMemory("The GPU ran out of memory for this task.")
            for step in range(1, job.steps + 1):
                progress(job.task_id, "denoising", step)
                if preview is not None and step in job.preview_steps:
                    gray = Image.new("RGB", (job.width, job.height), "gray")
                    preview(job.task_id, job.preview_steps.index(step), step, gray)
            out.append([Image.new("RGB", (job.width, job.height), "gray") for _ in job.seeds])
        return out


def complete_next_task(api: InProcessApi) -> None:
    """Run the oldest waiting task to completion with a `FlakyEngine`, in this thread."""
    worker = Worker(
        settings=api.settings,
        db=api.db,
        storage=open_storage(api.settings.storage_url),
        engine=FlakyEngine(),
    )
    assert worker.run_once()


@contextmanager
def background_worker(api: InProcessApi, engine: Any = None) -> Iterator[Worker]:
    """A worker thread on the API's database and storage (a `FlakyEngine` unless `engine` is
    given) that signals the app's waiting requests as its tasks settle, as `serve` wires it."""
    worker = Worker(
        settings=api.settings,
        db=api.db,
        storage=open_storage(api.settings.storage_url),
        engine=engine or FlakyEngine(),
        on_changed=api.app.state.signals.notify,
    )
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        worker.shutdown()
        thread.join(timeout=30)


@contextmanager
def unwritable(db: Database, *, sqlite_fault: str = "full") -> Iterator[None]:
    """`db` refusing writes while inside, by a fault of the database's own: on SQLite "full"
    (max_page_count at its size: a write that needs a new page fails) or "read-only"
    (query_only: every write fails); on PostgreSQL default_transaction_read_only."""
    engine = db.engine
    if engine.dialect.name == "sqlite":

        def full(dbapi_conn: Any, record: Any) -> None:
            if sqlite_fault == "read-only":
                dbapi_conn.execute("PRAGMA query_only = 1")
                return
            pages = dbapi_conn.execute("PRAGMA page_count").fetchone()[0]
            dbapi_conn.execute(f"PRAGMA max_page_count = {pages}")

        event.listen(engine, "connect", full)
        engine.dispose()  # every connection from now on is a new one, full
        try:
            yield
        finally:
            event.remove(engine, "connect", full)
            engine.dispose()
        return
    url = engine.url
    admin = url.set(drivername="postgresql", database="postgres").render_as_string(False)

    def read_only(on: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                f'ALTER DATABASE "{url.database}" SET default_transaction_read_only = '
                + ("on" if on else "off")
            )
        engine.dispose()

    read_only(True)
    try:
        yield
    finally:
        read_only(False)


# The npm package the Node SDK tests install, pinned (scripts/test.sh installs node and npm).
OPENAI_NODE = "openai@7.59.0"


def install_node_openai() -> Path:
    """A folder with the pinned `openai` npm package, installed once per machine into the
    user's cache (`$XDG_CACHE_HOME` or ~/.cache, `cogview-api-tests/`). A script written
    beside its node_modules can `import OpenAI from 'openai'`."""
    node, npm = shutil.which("node"), shutil.which("npm")
    assert node and npm, "node and npm are needed (scripts/test.sh installs them)"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    folder = cache / "cogview-api-tests" / f"node-{OPENAI_NODE.replace('@', '-')}"
    if not (folder / "node_modules" / "openai" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(folder)]
            + [OPENAI_NODE],
            check=True,
            timeout=300,
        )
    return folder
