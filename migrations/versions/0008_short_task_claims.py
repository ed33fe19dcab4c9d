"""claims and leases on short tasks (ingestion, batch embedding, evaluation)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 10:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

TABLES = ("datasets", "embedding_jobs", "checkpoints")


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table, schema=None) as batch_op:
            batch_op.add_column(
                sa.Column("task_token", sa.Integer(), nullable=False, server_default="0")
            )
            batch_op.add_column(
                sa.Column("task_attempts", sa.Integer(), nullable=False, server_default="0")
            )
            batch_op.add_column(
                sa.Column("task_lease_expires_at", sa.DateTime(timezone=True), nullable=True)
            )
            batch_op.add_column(
                sa.Column("task_sent_at", sa.DateTime(timezone=True), nullable=True)
            )
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("evaluation_error", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_column("evaluation_error")
    for table in reversed(TABLES):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for column in ("task_sent_at", "task_lease_expires_at", "task_attempts", "task_token"):
                batch_op.drop_column(column)
