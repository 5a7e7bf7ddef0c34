"""images: the stored file's size and SHA-256

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 01:05:00

Recorded by the worker when it stores the file and checked before the file is served, so a file
damaged in storage is refused rather than served as a valid image; the SHA-256 is also the
image's ETag. NULL for images stored before this revision (served unchecked, as before).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMN, nullable: no table rebuild on SQLite (which would drop 0004's triggers).
    op.add_column("images", sa.Column("size_bytes", sa.BigInteger(), nullable=True))
    op.add_column("images", sa.Column("sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # ALTER TABLE ... DROP COLUMN in place (SQLite 3.35+), not a batch rebuild of the table,
    # which would drop 0004's trigger on images.
    op.drop_column("images", "sha256")
    op.drop_column("images", "size_bytes")
