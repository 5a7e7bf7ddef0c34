"""tasks.surface, and the admin audit log

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 04:10:00

`tasks.surface` records which API a task came in by (native, openai, zhipu), for the usage
reports' split by surface; tasks created before this revision count as native. `admin_audit`
holds one row per admin action (admin API or CLI): who (the admin token's name, or `cli`),
what, on which key, when. Both are only ever added to.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN with a default: no table rebuild on SQLite (which would drop 0004's
    # triggers on tasks).
    op.add_column(
        "tasks",
        sa.Column("surface", sa.String(length=16), nullable=False, server_default="native"),
    )
    op.create_table(
        "admin_audit",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_admin_audit")),
    )
    op.create_index("ix_admin_audit_key_id", "admin_audit", ["key_id"])
    op.create_index("ix_ledger_created_at", "ledger", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_ledger_created_at", table_name="ledger")
    op.drop_index("ix_admin_audit_key_id", table_name="admin_audit")
    op.drop_table("admin_audit")
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+), not a batch rebuild.
    op.drop_column("tasks", "surface")
