"""idempotency keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 05:10:00

One row per (API key, Idempotency-Key header): the hash of the request it was first used with and
the task that request created, so a retry within 24 h gets the same task and is charged once.
`task_id` is null only inside the submit transaction: the row is inserted first (so a racing
retry blocks on its primary key before reserving any credits), and filled in once the task exists.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import cogview_api.store.tables

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_keys",
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("idem_key", sa.String(length=255), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("task_id", sa.String(length=64), nullable=True),
        sa.Column(
            "created_at", cogview_api.store.tables.UTCDateTime(timezone=True), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_idempotency_keys_key_id_api_keys")
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_idempotency_keys_task_id_tasks")
        ),
        sa.PrimaryKeyConstraint("key_id", "idem_key", name=op.f("pk_idempotency_keys")),
    )
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.create_index("ix_idempotency_keys_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("idempotency_keys", schema=None) as batch_op:
        batch_op.drop_index("ix_idempotency_keys_created_at")
    op.drop_table("idempotency_keys")
