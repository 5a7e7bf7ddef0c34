"""batches: a batch's record, its tasks' batch_id and batch_index, batch webhooks

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-02 07:10:00

`batches`: one row per `POST /api/v1/batches`, with `live` (its tasks not yet ended), which the
transaction that ends one of them decrements: the one that takes it to 0 ends the batch (row
locks make that exactly one, also on PostgreSQL). `tasks.batch_id` and `tasks.batch_index`
(nullable: a task submitted alone has neither) with an index that reads a batch's tasks in
order. `webhook_deliveries.batch_id`: a batch's `batch.completed` / `batch.cancelled` webhook
rides the same delivery queue as the tasks' (its task_id NULL). `idempotency_keys.batch_id`:
the batch an Idempotency-Key's request created.

`tasks` and `idempotency_keys` get plain ADD COLUMNs (nullable, no default): no table rebuild on
SQLite, which would drop migration 0004's triggers on `tasks`. `webhook_deliveries.task_id`
becomes nullable, which SQLite can only do by rebuilding that table (it has no triggers).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cogview_api.store.tables import UTCDateTime

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("seq", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("images_total", sa.Integer(), nullable=False),
        sa.Column("live", sa.Integer(), nullable=False),
        sa.Column("callback_url", sa.Text(), nullable=True),
        sa.Column("base_url", sa.Text(), nullable=True),
        sa.Column("user_metadata", sa.JSON(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("finished_at", UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name=op.f("fk_batches_key_id_api_keys")
        ),
        sa.PrimaryKeyConstraint("seq", name=op.f("pk_batches")),
        sa.UniqueConstraint("id", name=op.f("uq_batches_id")),
    )
    op.create_index("ix_batches_key_seq", "batches", ["key_id", "seq"])
    op.add_column("tasks", sa.Column("batch_id", sa.String(length=64), nullable=True))
    op.add_column("tasks", sa.Column("batch_index", sa.Integer(), nullable=True))
    op.create_index("ix_tasks_batch_index", "tasks", ["batch_id", "batch_index"])
    op.add_column("idempotency_keys", sa.Column("batch_id", sa.String(length=64), nullable=True))
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("batch_id", sa.String(length=64), nullable=True))
        batch_op.alter_column("task_id", existing_type=sa.String(length=64), nullable=True)
        batch_op.create_unique_constraint(op.f("uq_webhook_deliveries_batch_id"), ["batch_id"])


def downgrade() -> None:
    op.execute(
        "DELETE FROM webhook_attempts WHERE delivery_id IN "
        "(SELECT id FROM webhook_deliveries WHERE batch_id IS NOT NULL)"
    )
    op.execute("DELETE FROM webhook_deliveries WHERE batch_id IS NOT NULL")
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_constraint(op.f("uq_webhook_deliveries_batch_id"), type_="unique")
        batch_op.alter_column("task_id", existing_type=sa.String(length=64), nullable=False)
        batch_op.drop_column("batch_id")
    op.drop_column("idempotency_keys", "batch_id")
    op.drop_index("ix_tasks_batch_index", table_name="tasks")
    op.drop_column("tasks", "batch_index")
    op.drop_column("tasks", "batch_id")
    op.drop_index("ix_batches_key_seq", table_name="batches")
    op.drop_table("batches")
