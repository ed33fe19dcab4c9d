"""starting weights: uploaded weights files, and the checkpoint or weights a job starts from

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-20 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

JOB_COLUMNS = ("start_checkpoint_id", "start_weights_id")


def upgrade() -> None:
    op.create_table(
        "weights",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("num_tensors", sa.Integer(), nullable=False),
        sa.Column("backbone", sa.String(length=100), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_weights_tenant"), "weights", ["tenant"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in JOB_COLUMNS:
            batch_op.add_column(sa.Column(column, sa.String(length=40), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        for column in JOB_COLUMNS:
            batch_op.drop_column(column)
    op.drop_index(op.f("ix_weights_tenant"), table_name="weights")
    op.drop_table("weights")
