"""follow_slots: held slots of the per-key caps on event streams and Prefer: wait; a key's own
caps (api_keys.max_streams, api_keys.max_waits)

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02 04:30:00

One row per open event stream or waiting `Prefer: wait` request, so every API process counts
the same slots; each row has a lease that its process renews, so a process that died frees its
slots when they lapse. `max_streams`, `max_waits`: a key's own caps (NULL: the settings'),
set with `cogview-api keys follow-limits`.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from cogview_api.store.tables import UTCDateTime

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("api_keys", sa.Column("max_streams", sa.Integer(), nullable=True))
    op.add_column("api_keys", sa.Column("max_waits", sa.Integer(), nullable=True))
    op.create_table(
        "follow_slots",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("holder", sa.String(length=32), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name="fk_follow_slots_key_id_api_keys"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_follow_slots"),
    )
    op.create_index("ix_follow_slots_key_id_kind", "follow_slots", ["key_id", "kind"])
    op.create_index("ix_follow_slots_holder", "follow_slots", ["holder"])


def downgrade() -> None:
    op.drop_index("ix_follow_slots_holder", table_name="follow_slots")
    op.drop_index("ix_follow_slots_key_id_kind", table_name="follow_slots")
    op.drop_table("follow_slots")
    # In place (SQLite 3.35+), not a batch rebuild, which would drop 0004's triggers.
    op.drop_column("api_keys", "max_waits")
    op.drop_column("api_keys", "max_streams")
