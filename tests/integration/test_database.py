"""The store on each backend (a SQLite file, a real PostgreSQL server): the migrations build the
schema of `tables.py`, concurrent claims never share a task, and a database that is down or
drops a connection is a 503 ("try again"), never a driver exception."""

from __future__ import annotations

import subprocess
import threading
from collections import Counter
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from cogview_api.clock import utcnow
from cogview_api.config import Settings
from cogview_api.domain import GenerationRequest, Size
from cogview_api.errors import InvalidRequest, ServiceUnavailable
from cogview_api.services import generation
from cogview_api.services import keys as key_service
from cogview_api.store import keys as key_store
from cogview_api.store import queue
from cogview_api.store.db import Database, alembic_config
from cogview_api.store.tables import metadata
from tests.pg import PgCluster
from tests.support import CLI, free_port, server_env


def test_migrations_build_exactly_the_schema_of_the_tables(db: Database) -> None:
    with db.engine.connect() as conn:
        differences = compare_metadata(MigrationContext.configure(conn), metadata)
    assert differences == []


def test_concurrent_workers_never_claim_the_same_task(db: Database, settings: Settings) -> None:
    key, _ = key_service.create_key(db, name="k", credits=4 * 40)
    sizes = [Size(1024, 1024), Size(768, 1344)]
    for i in range(40):
        request = GenerationRequest(
            model="cogview-4", prompt=f"cat {i}", size=sizes[i % 2], quality="hd", n=1
        )
        generation.submit(db, settings, key=key, request=request)
    claimed: list[str] = []
    start = threading.Barrier(6)

    def work(worker_id: str) -> None:
        start.wait()
        while True:
            with db.write() as conn:
                ids = queue.claim_batch(conn, worker_id=worker_id, limit=3, lease_seconds=30)
            if not ids:
                return
            claimed.extend(ids)

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(claimed) == 40
    assert Counter(claimed).most_common(1)[0][1] == 1


@pytest.mark.parametrize(
    ("name", "note", "param"),
    [("n" * 201, None, "name"), ("nul\x00", None, "name"), ("k", "x" * 201, "note")],
    ids=["name-too-long", "name-nul", "note-too-long"],
)
def test_names_and_notes_a_database_cannot_hold_are_refused(
    db: Database, name: str, note: str | None, param: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        key, _ = key_service.create_key(db, name=name, credits=1)
        key_service.grant_credits(db, key_id=key.id, amount=1, note=note)
    assert caught.value.param == param


# -- PostgreSQL only ----------------------------------------------------------------------------


def test_unreachable_postgres_is_service_unavailable() -> None:
    db = Database(f"postgresql://postgres@127.0.0.1:{free_port()}/nothing")
    assert db.ping() is False
    with pytest.raises(ServiceUnavailable), db.read():
        pass
    with pytest.raises(ServiceUnavailable):
        db.migrate()


def test_a_dropped_connection_is_service_unavailable_then_the_next_one_works(
    pg_cluster: PgCluster,
) -> None:
    db = Database(pg_cluster.create_database(migrated=True))
    try:
        with pytest.raises(ServiceUnavailable), db.read() as conn:  # noqa: PT012
            conn.execute(text("SELECT 1"))
            assert pg_cluster.terminate_backends(db.url) >= 1
            conn.execute(text("SELECT 1"))
        assert db.ping() is True  # the pool replaced the dead connection
    finally:
        db.dispose()


def test_cli_migrate_on_postgres(pg_cluster: PgCluster, tmp_path: Path, tiny_cache: Path) -> None:
    url = pg_cluster.create_database()
    env = server_env(tiny_cache, {"COGVIEW_DATABASE_URL": url})
    for _ in range(2):  # the second run finds nothing to do
        done = subprocess.run(
            [*CLI, "migrate"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        assert "up to date" in done.stdout
    db = Database(url)
    try:
        with db.read() as conn:
            tables = set(
                conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                ).scalars()
            )
    finally:
        db.dispose()
    assert {"api_keys", "ledger", "tasks", "images", "workers", "alembic_version"} <= tables

    down = {**env, "COGVIEW_DATABASE_URL": f"postgresql://postgres@127.0.0.1:{free_port()}/x"}
    failed = subprocess.run(
        [*CLI, "migrate"], cwd=tmp_path, env=down, capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 1
    assert failed.stderr.strip() == "cogview-api: The database is unavailable; try again shortly."


def test_upgrading_a_database_with_data_from_the_first_schema_keeps_it(
    empty_database_url: str,
) -> None:
    """A deployment upgrades a database with keys and ledger rows in it, not an empty one: on
    SQLite a migration that rebuilds a table others point at (batch mode) must not trip over
    their foreign keys, and every key gets its webhook secret."""
    database = Database(empty_database_url)
    try:
        command.upgrade(alembic_config(database.url, database.engine), "0001")
        with database.engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, name, key_hash, prefix, balance, created_at) "
                    "VALUES ('k1', 'old', :hash, 'cv4_old', 40, :now)"
                ),
                {"hash": "0" * 64, "now": utcnow()},
            )
            conn.execute(
                text(
                    "INSERT INTO ledger (key_id, kind, amount, note, created_at) "
                    "VALUES ('k1', 'grant', 40, 'before the upgrade', :now)"
                ),
                {"now": utcnow()},
            )
        database.migrate()
        with database.read() as conn:
            key = key_store.get_key(conn, "k1")
            assert key.balance == 40 and key_store.ledger_sum(conn, "k1") == 40
            secret = conn.execute(text("SELECT webhook_secret FROM api_keys")).scalar_one()
            assert secret.startswith("whsec_")
        if database.engine.dialect.name == "sqlite":  # still enforced after the migration
            with database.engine.connect() as conn:
                assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar_one() == 1
    finally:
        database.dispose()
