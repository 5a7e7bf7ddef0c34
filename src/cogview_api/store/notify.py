"""Wake-ups through PostgreSQL `LISTEN/NOTIFY`, so an idle worker starts a new task at once.

A write that makes work (a submit, a lapsed lease put back in the queue) calls `announce` inside
its own transaction: PostgreSQL delivers the notification when that transaction commits, and
drops it on rollback, so a worker never wakes for a task that does not exist. Each worker
process keeps one dedicated connection LISTENing in a `Listener` thread, which sets the workers'
wake events. The notification only shortens the wait: the claim itself still reads the queue,
and workers still poll every `COGVIEW_POLL_INTERVAL`, so a lost notification (listener
reconnecting, database restart) costs at most one poll interval. SQLite has no such channel;
there an in-process API wakes its workers directly and separate processes poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

CHANNEL = "cogview_tasks"
# A watched task changed (progress, a settle, a claim, a cancel) or a key was revoked: each API
# process's task watcher (services/watch.py) reads its watched tasks again, once for all.
CHANGES_CHANNEL = "cogview_task_changes"
# Reconnect delays after the listen connection fails: doubling from the first to the last.
BACKOFF_FIRST_S = 0.2
BACKOFF_MAX_S = 5.0
# How often the listener thread looks at its stop flag while no notification comes.
CHECK_STOP_S = 0.5


_NOTIFY = text("SELECT pg_notify(:channel, '')")


def announce(conn: Connection) -> None:
    """Tell listening workers there is work, when the caller's transaction commits.

    PostgreSQL folds identical notifications of one transaction into one. No-op on SQLite.
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"channel": CHANNEL})


def announce_change(conn: Connection) -> None:
    """Tell the API processes' task watchers that a task or a key changed, on commit.

    Folded into one notification per transaction. No-op on SQLite (watchers there poll).
    """
    if conn.dialect.name == "postgresql":
        conn.execute(_NOTIFY, {"channel": CHANGES_CHANNEL})


def libpq_dsn(url: str) -> str:
    """The SQLAlchemy URL (`postgresql+psycopg://...`) as a URL libpq accepts."""
    parsed = make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


class Listener:
    """One autocommit connection LISTENing on `channel` (new tasks by default); calls
    `on_notify` for each notification.

    Runs in a daemon thread. If the connection fails (database restart, network), it
    reconnects with a doubling backoff, and calls `on_notify` once after every (re)connect,
    since anything announced while it was away is lost.
    """

    def __init__(self, url: str, on_notify: Callable[[], None], *, channel: str = CHANNEL) -> None:
        self.dsn = libpq_dsn(url)
        self.channel = channel
        self.on_notify = on_notify
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="pg-listener")
        self.connected = threading.Event()  # set while LISTENing; tests and logs read it

    def start(self) -> Listener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=CHECK_STOP_S + 5)

    def _run(self) -> None:
        delay = BACKOFF_FIRST_S
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
                    conn.execute(f"LISTEN {self.channel}")
                    self.connected.set()
                    log.info("listening on channel %s", self.channel)
                    delay = BACKOFF_FIRST_S
                    self.on_notify()
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=CHECK_STOP_S):
                            self.on_notify()
                            if self._stop.is_set():
                                break
            except psycopg.Error as exc:
                self.connected.clear()
                log.warning("task listener: %s; reconnecting in %.1f s", exc, delay)
                self._stop.wait(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
            finally:
                self.connected.clear()
