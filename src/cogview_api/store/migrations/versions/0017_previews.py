"""previews: partial previews of a task's image while it is denoised

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-02 07:10:00

`tasks.previews`: how many previews the request asked for (NULL: none, as for every task
created before this revision); `tasks.previews_made`: how many are stored so far, which the
event streams' watcher reads as part of a task's version. `previews`: one row per stored
preview, served like an image by its random token and deleted with the same retention.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cogview_api.store.tables import UTCDateTime

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("tasks", sa.Column("previews", sa.Integer(), nullable=True))
    op.add_column("tasks", sa.Column("previews_made", sa.Integer(), nullable=True))
    op.create_table(
        "previews",
        sa.Column("token", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(length=8), nullable=False),
        sa.Column("storage_key", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("deleted_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_previews_task_id_tasks"),
        sa.PrimaryKeyConstraint("token", name="pk_previews"),
        sa.UniqueConstraint("task_id", "idx", name="uq_previews_task_id"),
    )
    op.create_index("ix_previews_expires_at", "previews", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_previews_expires_at", table_name="previews")
    op.drop_table("previews")
    op.drop_column("tasks", "previews_made")
    op.drop_column("tasks", "previews")
