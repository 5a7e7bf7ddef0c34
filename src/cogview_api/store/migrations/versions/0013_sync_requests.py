"""sync_requests: the submits of the synchronous OpenAI and Zhipu routes, so an SDK's retry
joins the task of the request it repeats

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 05:30:00

One row per submit on those routes: the hash of its key, surface and body, and whether its
answer reached the client. A retry (docs/api.md, "Retries") finds it by (key_id,
request_hash); rows older than the retry window are deleted by the key's next submit there.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cogview_api.store.tables import UTCDateTime

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sync_requests",
        sa.Column("task_id", sa.String(length=64), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("answer", sa.String(length=16), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], name="fk_sync_requests_task_id_tasks"),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name="fk_sync_requests_key_id_api_keys"
        ),
        sa.PrimaryKeyConstraint("task_id", name="pk_sync_requests"),
    )
    op.create_index(
        "ix_sync_requests_key_id_request_hash", "sync_requests", ["key_id", "request_hash"]
    )
    op.create_index("ix_sync_requests_key_id_created_at", "sync_requests", ["key_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_sync_requests_key_id_created_at", table_name="sync_requests")
    op.drop_index("ix_sync_requests_key_id_request_hash", table_name="sync_requests")
    op.drop_table("sync_requests")
