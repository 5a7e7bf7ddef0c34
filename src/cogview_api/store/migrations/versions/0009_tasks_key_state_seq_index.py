"""tasks (key_id, state, seq) in place of (key_id, state), for queue positions

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 04:40:00

A waiting task's position replays the claim on each key's oldest waiting tasks
(store/positions.py): a key's first N waiting tasks in seq order. With (key_id, state) that read
sorted every waiting task of the key; with seq in the index it reads N rows. The per-key waiting
count that (key_id, state) served uses the longer index as well.
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_key_state_seq", "tasks", ["key_id", "state", "seq"])
    op.drop_index("ix_tasks_key_state", table_name="tasks")


def downgrade() -> None:
    op.create_index("ix_tasks_key_state", "tasks", ["key_id", "state"])
    op.drop_index("ix_tasks_key_state_seq", table_name="tasks")
