"""job resources (ranks per node, nodes) and node-rank claims of multi-node jobs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gpus", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("nodes", sa.Integer(), nullable=False, server_default="1"))
    op.create_table(
        "job_ranks",
        sa.Column("job_id", sa.String(length=40), nullable=False),
        sa.Column("node_rank", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(length=200), nullable=False),
        sa.Column("token", sa.Integer(), nullable=False),
        sa.Column("endpoint", sa.String(length=300), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "node_rank"),
    )


def downgrade() -> None:
    op.drop_table("job_ranks")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("nodes")
        batch_op.drop_column("gpus")
