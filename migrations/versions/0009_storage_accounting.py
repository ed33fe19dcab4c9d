"""storage accounting: extracted images, checkpoint sidecars and exports, embedding files,
and reservations of uploads in progress, all counted against the stored-bytes limit

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-10 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

SIZE_COLUMNS = (
    ("datasets", "images_bytes"),
    ("checkpoints", "extra_bytes"),
    ("embedding_jobs", "size_bytes"),
)


def upgrade() -> None:
    for table, column in SIZE_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column(column, sa.BigInteger(), server_default="0", nullable=False)
            )
    op.create_table(
        "storage_reservations",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_storage_reservations_tenant"), "storage_reservations", ["tenant"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_storage_reservations_tenant"), table_name="storage_reservations")
    op.drop_table("storage_reservations")
    for table, column in SIZE_COLUMNS:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.drop_column(column)
