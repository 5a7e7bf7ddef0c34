"""The database handle: one SQLAlchemy engine, read and write transactions, migrations.

SQLite runs in WAL mode with a busy timeout, and write transactions start with
`BEGIN IMMEDIATE` so two writers queue on the lock instead of failing on an upgrade.
PostgreSQL is a URL change (`postgresql://...`, driven by psycopg 3), at READ COMMITTED: the
guarded balance update and the `FOR UPDATE SKIP LOCKED` claims are correct at that level.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.pool import ConnectionPoolEntry

from cogview_api.errors import InvalidRequest, ServiceUnavailable

MIGRATIONS = Path(__file__).parent / "migrations"


def normalize_url(url: str) -> str:
    """`postgresql://` means psycopg 3 here, not the SQLAlchemy default psycopg2."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def _owner_only_file(path: Path) -> None:
    """Make the database file (it holds the keys' webhook signing secrets) readable by its owner
    only, before SQLite would create it with the umask's mode (0644, typically); SQLite gives
    its -wal and -shm files the database file's mode. A file that exists keeps its mode, and a
    folder made here is 0700."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists():  # not opened for writing: a read-only database is told apart later
        return
    with suppress(FileExistsError):  # another process made it in between
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        _owner_only_file(Path(parsed.database))
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": 30, "isolation_level": None},
        pool_size=8,
        max_overflow=8,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, record: ConnectionPoolEntry) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("cogview_write", False)
        # Straight to sqlite3, as a driver statement costs a pass through SQLAlchemy's execution
        # machinery (events, compiled cache, result) that a BEGIN has no use for: 6% of a poll.
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None  # a connection that begins is checked out, so it has one
        statement = "BEGIN IMMEDIATE" if immediate else "BEGIN"
        try:
            dbapi.execute(statement)
        except sqlite3.OperationalError as exc:
            # Raised past SQLAlchemy (a driver call of our own), so wrapped as it would wrap it,
            # for _translated: a read-only or locked file is a 503, not a 500.
            raise OperationalError(statement, None, exc) from exc

    return engine


def _postgres_engine(url: str) -> Engine:
    parsed = make_url(url)
    connect_args: dict[str, Any] = {}
    if "connect_timeout" not in parsed.query:
        # Without it an unreachable host hangs every request for the OS's TCP timeout (minutes).
        connect_args["connect_timeout"] = 10
    return create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=10,
        max_overflow=10,
    )


class Database:
    """Owns the engine. `read()` and `write()` give a connection inside one transaction."""

    def __init__(self, url: str) -> None:
        self.url = normalize_url(url)
        # SQLite has one writer at a time. Writers of this process queue on a lock, in order;
        # left to SQLite's busy handler they sleep and retry, which measured a 0.65 s p99
        # submit latency under 8 concurrent clients (bench/README.md).
        self._write_lock: threading.Lock | None = None
        if self.url.startswith("sqlite"):
            self.engine = _sqlite_engine(self.url)
            self._write_lock = threading.Lock()
        else:
            self.engine = _postgres_engine(self.url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with _translated(), self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with (
            self._write_lock or nullcontext(),
            _translated(),
            self.engine.connect().execution_options(cogview_write=True) as conn,
            conn.begin(),
        ):
            yield conn

    def ping(self) -> bool:
        try:
            with self.read() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except ServiceUnavailable:
            return False

    def disk_free(self) -> int | None:
        """Bytes this process may still write on the file system that holds a SQLite database
        file; None for a server database (or SQLite in memory)."""
        database = make_url(self.url).database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        return shutil.disk_usage(Path(database).parent).free

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        with _translated():
            command.upgrade(alembic_config(self.url, self.engine), "head")

    def dispose(self) -> None:
        self.engine.dispose()


def alembic_config(url: str, engine: Engine | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if engine is not None:
        cfg.attributes["engine"] = engine
    return cfg


@contextmanager
def _translated() -> Iterator[None]:
    """Driver errors that are not bugs, as our errors: a database that cannot be reached (or is
    locked, or chose this transaction as a deadlock victim) is a 503 to clients, "try again".
    """
    try:
        yield
    except OperationalError as exc:
        if "locked" in str(exc.orig).lower() or _is_disconnect(exc) or _is_transient(exc):
            raise ServiceUnavailable("The database is unavailable; try again shortly.") from exc
        if _is_unwritable(exc):
            raise ServiceUnavailable(
                "The database cannot take writes right now; try again shortly."
            ) from exc
        raise
    except PoolTimeout as exc:
        raise ServiceUnavailable("The database is busy; try again shortly.") from exc
    except DBAPIError as exc:
        if exc.connection_invalidated:
            raise ServiceUnavailable("The database is unavailable; try again shortly.") from exc
        if _is_unwritable(exc):  # PostgreSQL's read-only transaction is an InternalError
            raise ServiceUnavailable(
                "The database cannot take writes right now; try again shortly."
            ) from exc
        if isinstance(exc, DataError) and "NUL (0x00)" in str(exc.orig):
            # PostgreSQL cannot hold NUL in text; such an id or name cannot exist anyway.
            raise InvalidRequest("Text must not contain NUL (0x00) characters.") from exc
        raise


# A database that cannot be written (a full disk, a read-only file system, file or server):
# SQLite's messages; PostgreSQL's insufficient resources (53: disk full, out of memory, too many
# connections) and read-only transaction (25006: a standby, default_transaction_read_only).
_UNWRITABLE_SQLITE = ("disk is full", "readonly database", "disk i/o error")
_UNWRITABLE_SQLSTATES = ("53", "25006")


def _is_unwritable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    if sqlstate:
        return sqlstate.startswith(_UNWRITABLE_SQLSTATES)
    message = str(exc.orig).lower()
    return any(m in message for m in _UNWRITABLE_SQLITE)


def _is_disconnect(exc: OperationalError) -> bool:
    return bool(exc.connection_invalidated) or "connect" in str(exc.orig).lower()


# PostgreSQL SQLSTATE classes and codes worth a retry by the client: connection exceptions (08),
# operator intervention (57P: shutdown, restart), serialization failure and deadlock (40).
_TRANSIENT_SQLSTATES = ("08", "57P", "40001", "40P01")


def _is_transient(exc: OperationalError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None) or ""
    return sqlstate.startswith(_TRANSIENT_SQLSTATES)


def describe_database(url: str) -> str:
    """The database URL as it may be printed: without its password."""
    return make_url(url).render_as_string(hide_password=True)
