"""tasks: the JPEG/WebP quality a request asked for

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02 05:30:00

OpenAI's `output_compression` (0..100), which the worker hands the JPEG or WebP encoder. NULL
for tasks created before this revision and for requests that name none: the default quality.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("tasks", sa.Column("output_compression", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("tasks", "output_compression")
