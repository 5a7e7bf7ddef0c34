"""an index on tasks (key_id, state), for the per-key waiting limit

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 00:55:00

Each submit counts its key's waiting tasks (COGVIEW_MAX_WAITING_PER_KEY). With only
(key_id, seq) that count read every task the key ever had; with (key_id, state) it reads as many
rows as the key has waiting, which the limit bounds.
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_key_state", "tasks", ["key_id", "state"])


def downgrade() -> None:
    op.drop_index("ix_tasks_key_state", table_name="tasks")
