"""Alembic environment: runs migrations on the engine the app hands in, or on the URL.

On SQLite, altering a table means rebuilding it (Alembic's batch mode: copy, DROP, rename), and
the DROP of a table that other rows point at fails while foreign keys are enforced. So they are
switched off for the migration, as SQLite's documentation prescribes for schema changes, checked
with `PRAGMA foreign_key_check` before the commit, and switched back on for the pooled
connection. The PRAGMA only works outside a transaction, hence on the raw connection first.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from cogview_api.store.tables import metadata

config = context.config
url = str(config.get_main_option("sqlalchemy.url"))
engine = config.attributes.get("engine") or create_engine(url)


def _set_sqlite_foreign_keys(connection: Connection, on: bool) -> None:
    raw = connection.connection.dbapi_connection
    assert raw is not None
    raw.execute(f"PRAGMA foreign_keys={'ON' if on else 'OFF'}")


with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        _set_sqlite_foreign_keys(connection, on=False)
    try:
        context.configure(connection=connection, target_metadata=metadata, render_as_batch=sqlite)
        with context.begin_transaction():
            context.run_migrations()
            if sqlite:
                broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
                if broken:
                    raise RuntimeError(f"migration left rows with dangling references: {broken}")
        connection.commit()
    finally:
        if sqlite:
            _set_sqlite_foreign_keys(connection, on=True)
