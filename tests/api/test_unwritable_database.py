"""A database that cannot take writes answers 503 with Retry-After, charges nothing, and
recovers without a restart (issue: hardening, finding 6: submits answered 500). The faults are
the databases' own: SQLite's max_page_count (its "database or disk is full", as from a full
disk) and PostgreSQL's default_transaction_read_only (as on a standby or a read-only volume)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from sqlalchemy import event
from sqlalchemy.engine import make_url

from tests.api.test_bad_input import assert_error
from tests.support import EXAMPLE_BODY, InProcessApi, auth


@contextmanager
def unwritable(api: InProcessApi) -> Iterator[None]:
    engine = api.db.engine
    if engine.dialect.name == "sqlite":

        def full(dbapi_conn: Any, record: Any) -> None:
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
    url = make_url(api.settings.database_url)
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


def test_an_unwritable_database_is_503_charges_nothing_and_recovers(api: InProcessApi) -> None:
    key = api.make_key(credits=40)
    # Enough tasks that SQLite needs new pages for the next one.
    for _ in range(3):
        r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
        assert r.status_code == 200, r.text
    with unwritable(api):
        for _ in range(20):
            big = {**EXAMPLE_BODY, "prompt": "a lighthouse " * 70}
            r = api.client.post("/api/v1/images/generations", json=big, headers=auth(key))
            if r.status_code != 200:
                break
        assert_error(r, 503, "service_unavailable")
        assert r.headers["retry-after"].isdigit()
        assert "writes" in r.json()["error"]["message"]
        account = api.client.get("/api/v1/account", headers=auth(key)).json()["data"]
        charged = 40 - account["balance"]
    listed = api.client.get("/api/v1/tasks", headers=auth(key), params={"limit": 100}).json()
    assert charged == 4 * len(listed["data"]["tasks"])  # every charge has its task
    r = api.client.post("/api/v1/images/generations", json=EXAMPLE_BODY, headers=auth(key))
    assert r.status_code == 200, r.text  # recovered, same process
