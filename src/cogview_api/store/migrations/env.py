"""Alembic environment: runs migrations on the engine the app hands in, or on the URL."""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from cogview_api.store.tables import metadata

config = context.config
url = str(config.get_main_option("sqlalchemy.url"))
engine = config.attributes.get("engine") or create_engine(url)

with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()
