"""tasks: the queue class (priority), and an index for claims and positions by class

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-02 07:00:00

`priority` is domain.PriorityClass: 0 interactive (every task before this revision), 1 batch.
A claim takes the lowest class's waiting tasks first; the index (state, priority, key_id, seq)
serves the claim's per-class key heads and the queue positions' per-class reads (a key's oldest
waiting tasks of one class, the keys with tasks of a class waiting, the tasks of earlier classes)
without reading the other class's rows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column(
        "tasks", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0")
    )
    op.create_index(
        "ix_tasks_state_priority_key_seq", "tasks", ["state", "priority", "key_id", "seq"]
    )


def downgrade() -> None:
    op.drop_index("ix_tasks_state_priority_key_seq", table_name="tasks")
    op.drop_column("tasks", "priority")
