"""tasks: an index for the queue positions' window, a class's waiting tasks oldest first

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-02 16:00:00

The queue positions (store/positions.py) read the oldest waiting tasks of one class of the keys
they have not met yet: (state, priority, seq) gives them in order, and key_id in the index lets
the keys already met be passed over without reading their rows, so a key's backlog of
thousands costs an index walk, not a read of each task.
"""

from __future__ import annotations

from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tasks_state_priority_seq", "tasks", ["state", "priority", "seq", "key_id"])


def downgrade() -> None:
    op.drop_index("ix_tasks_state_priority_seq", table_name="tasks")
