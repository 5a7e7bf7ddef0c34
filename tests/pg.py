"""A throwaway PostgreSQL cluster for the tests, from Debian's server binaries.

One cluster per test session in a temp folder (loopback TCP on a free port, its socket in the
same folder, `trust` auth, fsync off), and one fresh database per test. A test that wants the
newest schema gets a copy of one template database that the session migrates with Alembic
once, on first use: `CREATE DATABASE ... TEMPLATE` copies its files in a few tens of ms, where
running the migrations takes 0.65-1.0 s. initdb refuses to run as root, so under root (CI) the
server runs as the system user `cogview-test`, made if missing.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from cogview_api.store.db import Database
from tests.support import free_port

PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
RUN_AS = "cogview-test"
REQUIRE_ENV = "COGVIEW_TEST_REQUIRE_PG"
# The session's migrated template; no test connects to it (it refuses connections once made).
TEMPLATE = "cogview_template"


def find_bindir() -> Path | None:
    """The newest installed server version's bin folder, or None."""
    found = [Path(p) for p in glob.glob(PG_BIN_GLOB) if (Path(p) / "initdb").is_file()]
    if not found:
        return None
    return max(found, key=lambda p: _version_key(p.parent.name))


def missing_message() -> str:
    return (
        f"PostgreSQL server binaries not found ({PG_BIN_GLOB}/initdb): install Debian's "
        "`postgresql` package (apt-get install -y postgresql); scripts/test.sh does this."
    )


@dataclass
class PgCluster:
    bindir: Path
    root: Path
    port: int
    user: pwd.struct_passwd | None  # who the server runs as; None = this process's user
    _template_ready: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # One migrated database made ahead, while the test that took the last one runs: the copy
    # is the server's work, so it overlaps with the test's instead of adding to it.
    _spare: Future[str] | None = field(default=None, init=False)
    _maker: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="pg-spare"), init=False
    )

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self, *, migrated: bool = False) -> str:
        """A fresh database of its own; returns its URL. Empty (a copy of template0), or with
        `migrated` at the newest schema (a copy of the session's migrated template, made
        ahead of the call). No two calls get the same database."""
        if not migrated:
            return self.url(self._copy("template0"))
        self._migrate_template()
        with self._lock:
            spare, self._spare = self._spare, self._maker.submit(self._copy, TEMPLATE)
        if spare is not None:
            try:
                return self.url(spare.result())
            except psycopg.Error:
                pass  # made while the server was stopped for a restart test: make one now
        return self.url(self._copy(TEMPLATE))

    def _copy(self, template: str, name: str | None = None) -> str:
        """CREATE DATABASE from `template` (a copy of its files); returns the new name."""
        name = name or "t_" + secrets.token_hex(6)
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
        return name

    def _migrate_template(self) -> None:
        """Make the template database and bring it to the newest schema with Alembic, on the
        session's first call. It is then marked a template that takes no connections: a copy
        needs the template to have none, and nothing can change it after the migration."""
        with self._lock:
            if self._template_ready:
                return
            self._copy("template0", TEMPLATE)
            database = Database(self.url(TEMPLATE))
            try:
                database.migrate()
            finally:
                database.dispose()
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(
                    f'ALTER DATABASE "{TEMPLATE}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false'
                )
            self._template_ready = True

    def drop_database(self, url: str) -> None:
        """Dropped on the spares' thread, after the test: the DROP took ~60 ms of each
        PostgreSQL test's teardown. One that fails (the server stopped by a restart test) stays,
        a few MB in a throwaway cluster."""
        self._maker.submit(self._drop, url.rsplit("/", 1)[1])

    def _drop(self, name: str) -> None:
        try:
            with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except psycopg.Error:
            pass

    def terminate_backends(self, url: str) -> int:
        """Kill every server process connected to that database, like a server restart would."""
        name = url.rsplit("/", 1)[1]
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            ).fetchall()
        return len(rows)

    # -- lifecycle ----------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            **_as_user(self.user),
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stdout}{done.stderr}"
                f"{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        log = self.root / "server.log"
        return "\nserver log:\n" + log.read_text(errors="replace")[-3000:] if log.exists() else ""

    def start(self) -> PgCluster:
        self._run(
            str(self.bindir / "initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        )
        self.start_server()
        return self

    def start_server(self) -> None:
        """Start the server on the cluster's data folder and port; returns once it accepts
        connections. With `stop_server`, a restart on the same port, as after a crash or an
        upgrade: clients must reconnect by themselves."""
        options = " ".join(
            [
                f"-h 127.0.0.1 -p {self.port} -k {self.root}",
                "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "-c max_connections=300 -c shared_buffers=32MB",
            ]
        )
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
            timeout=90,
        )

    def stop_server(self, mode: str = "fast") -> None:
        """`pg_ctl stop -m fast`: ends every session (clients see their connections drop) and
        shuts down cleanly; the data stays for `start_server`."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")

    def stop(self) -> None:
        self._maker.shutdown(wait=True, cancel_futures=True)
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(bindir: Path) -> PgCluster:
    user = _server_user()
    root = Path(tempfile.mkdtemp(prefix="cogview-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    cluster = PgCluster(bindir=bindir, root=root, port=free_port(), user=user)
    try:
        return cluster.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _server_user() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(RUN_AS)
    except KeyError:
        # Not checked: a parallel test process (pytest-xdist) may have made it first; the
        # lookup after says whether the user is there.
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", RUN_AS],
            capture_output=True,
        )
        return pwd.getpwnam(RUN_AS)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())
