"""embedding jobs, checkpoint quality

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 08:30:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.add_column(sa.Column("quality", sa.JSON(), nullable=True))

    op.create_table(
        "embedding_jobs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant", sa.String(length=100), nullable=False),
        sa.Column("job_id", sa.String(length=40), nullable=True),
        sa.Column("checkpoint_id", sa.String(length=40), nullable=False),
        sa.Column("dataset_id", sa.String(length=40), nullable=False),
        sa.Column("layer", sa.String(length=20), nullable=False),
        sa.Column("normalize", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("num_rows", sa.Integer(), nullable=True),
        sa.Column("error_code", sa.String(length=50), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("path", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["checkpoint_id"], ["checkpoints.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("embedding_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_embedding_jobs_checkpoint_id"), ["checkpoint_id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_embedding_jobs_dataset_id"), ["dataset_id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_embedding_jobs_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_embedding_jobs_tenant"), ["tenant"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("embedding_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_embedding_jobs_tenant"))
        batch_op.drop_index(batch_op.f("ix_embedding_jobs_job_id"))
        batch_op.drop_index(batch_op.f("ix_embedding_jobs_dataset_id"))
        batch_op.drop_index(batch_op.f("ix_embedding_jobs_checkpoint_id"))

    op.drop_table("embedding_jobs")
    with op.batch_alter_table("checkpoints", schema=None) as batch_op:
        batch_op.drop_column("quality")
