"""api_keys: per-key limits and the submit rate's state

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 04:30:00

`submit_rate`, `submit_burst`, `max_waiting`: a key's own limits (NULL: the settings' defaults),
set with `cogview-api keys limits`. `submit_tat`: the key's GCRA "theoretical arrival time" of
its next submit, in seconds since the epoch (NULL: never limited yet), moved by one conditional
UPDATE in each submit's transaction, so every API replica enforces the same rate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_COLUMNS = ("submit_rate", "submit_burst", "max_waiting", "submit_tat")


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("api_keys", sa.Column("submit_rate", sa.Double(), nullable=True))
    op.add_column("api_keys", sa.Column("submit_burst", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("max_waiting", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("submit_tat", sa.Double(), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+), not a batch rebuild of the table,
    # which would drop the triggers of 0004.
    for name in reversed(_COLUMNS):
        op.drop_column("api_keys", name)
