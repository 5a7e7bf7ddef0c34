"""tasks: the request id of the request that created the task

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-02 04:20:00

The worker binds it, with the task id, to its log lines about the task, so one id finds the
API's and the worker's lines of a request. NULL for tasks created before this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("tasks", sa.Column("request_id", sa.String(length=128), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "request_id")
