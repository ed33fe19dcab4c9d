"""SQLAlchemy models: the database is the source of truth for datasets, jobs and events.

The broker only carries "look at job X"; every state a user can see is a row here.
Alembic migrations in migrations/ must agree with these models (a test checks it).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# A removed dataset that finished jobs still refer to: its row stays, hidden everywhere.
DELETED_DATASET = "deleted"
DatasetStatus = Literal["validating", "ready", "failed", "deleted"]
JobStatus = Literal["queued", "running", "cancelling", "succeeded", "failed", "cancelled"]
EmbeddingJobStatus = Literal["queued", "running", "succeeded", "failed"]
DATASET_STATUSES: tuple[str, ...] = get_args(DatasetStatus)
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_JOB_STATUSES = frozenset({"queued", "running", "cancelling"})
ACTIVE_EMBEDDING_JOB_STATUSES = frozenset({"queued", "running"})
MAX_INTEGER = 2**31 - 1  # the largest value an Integer column holds on PostgreSQL


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """A stored time, timezone-aware: SQLite returns naive datetimes, and every stored
    time is UTC (PostgreSQL's come back aware already)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(8)}"


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class ShortTaskClaim:
    """The claim on a row's short task (ingestion, batch embedding, evaluation), as
    worker/short_lease.py takes and renews it and the reconciler repairs it.

    A claim bumps `task_token` (a compare-and-set, so a duplicate delivery never runs the
    task twice at once) and counts an attempt; `task_lease_expires_at` is set while a
    worker holds the row, `task_sent_at` when its message was last sent (null: when the
    row was made or the task requested).
    """

    task_token: Mapped[int] = mapped_column(Integer, default=0)
    task_attempts: Mapped[int] = mapped_column(Integer, default=0)
    task_lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    task_sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Dataset(ShortTaskClaim, Base):
    __tablename__ = "datasets"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[str] = mapped_column(String(20))
    archive_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # The extracted images on disk, measured at ingestion (0 until then, and once failed).
    images_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    num_images: Mapped[int | None] = mapped_column(Integer)
    num_skipped: Mapped[int | None] = mapped_column(Integer)
    skipped: Mapped[list[Any] | None] = mapped_column(JSON)
    classes: Mapped[list[Any] | None] = mapped_column(JSON)
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    # swav_core.recipe.DatasetStats of the ready images (for preset auto); null before 0006
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_tenant_status", "tenant", "status"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    preset: Mapped[str | None] = mapped_column(String(50))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    user_metadata: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    status: Mapped[str] = mapped_column(String(20))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer, default=0)
    epochs: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    eta_s: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    compute_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Lease: the runner that holds the job; a new claim bumps the fencing token.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fencing_token: Mapped[int] = mapped_column(Integer, default=0)
    # Recovery: how many claims a job may take, and how long it may run in all.
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    max_runtime_s: Mapped[float | None] = mapped_column(Float)
    # "knn_top1" or "linear_top1": the checkpoint best by it is pinned against pruning.
    keep_best_by: Mapped[str | None] = mapped_column(String(20))
    # When the train message was last sent: the reconciler re-sends a lost one.
    dispatched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Resources: ranks per node (GPUs, or CPU processes on a worker without one) and nodes.
    gpus: Mapped[int] = mapped_column(Integer, default=1)
    nodes: Mapped[int] = mapped_column(Integer, default=1)
    # Starting weights of a fresh run: a checkpoint of the tenant's, or uploaded weights
    # (at most one; no foreign key: either may be deleted later, failing only a new run).
    start_checkpoint_id: Mapped[str | None] = mapped_column(String(40))
    start_weights_id: Mapped[str | None] = mapped_column(String(40))


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (UniqueConstraint("job_id", "seq", name="uq_job_events_job_seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(30))
    data: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Checkpoint(ShortTaskClaim, Base):
    __tablename__ = "checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", "final", name="uq_checkpoints_step"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[int] = mapped_column(Integer)
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    # The files kept beside it: its sha256 sidecar and the safetensors exports made of it.
    extra_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    sha256: Mapped[str] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    available: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # {"knn_top1", "linear_top1", "n_train", "n_val"} on the job's dataset (labelled only).
    quality: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # The job's best checkpoint by its `keep_best_by` metric (kept when others are pruned).
    best: Mapped[bool] = mapped_column(Boolean, default=False)
    # Set while its quality report is queued or computed (one in flight per checkpoint).
    evaluation_requested_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # {"code", "message"} of the last quality report that could not be computed.
    evaluation_error: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Worker(Base):
    """A worker process's heartbeat: who serves which queues, with what, and when last seen."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    queues: Mapped[str] = mapped_column(String(200))
    resources: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    job_id: Mapped[str | None] = mapped_column(String(40))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class JobRank(Base):
    """A worker's claim on one node of a multi-node job (worker/gang.py).

    Each of the job's `nodes` workers holds one row under a lease of its own; `token` is
    the job's fencing token when the rank was claimed (the gang trains at token + 1).
    Node rank 0's row carries the rendezvous endpoint (host:port) that the other nodes
    join. The rows of a job are deleted whenever it leaves a run (requeued or finished).
    """

    __tablename__ = "job_ranks"

    job_id: Mapped[str] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    node_rank: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner: Mapped[str] = mapped_column(String(200))
    token: Mapped[int] = mapped_column(Integer)
    endpoint: Mapped[str | None] = mapped_column(String(300))
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    # Set when this node's training process ended (a finished node is not a lost one).
    exit_code: Mapped[int | None] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


EMBEDDING_JOB_STATUSES: tuple[str, ...] = get_args(EmbeddingJobStatus)


class EmbeddingJob(ShortTaskClaim, Base):
    """A batch embedding of a whole dataset with one checkpoint (short-queue task)."""

    __tablename__ = "embedding_jobs"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    job_id: Mapped[str | None] = mapped_column(
        ForeignKey("jobs.id", ondelete="CASCADE"), index=True
    )
    checkpoint_id: Mapped[str] = mapped_column(
        ForeignKey("checkpoints.id", ondelete="CASCADE"), index=True
    )
    dataset_id: Mapped[str] = mapped_column(ForeignKey("datasets.id"), index=True)
    layer: Mapped[str] = mapped_column(String(20))
    normalize: Mapped[bool] = mapped_column(Boolean, default=True)
    status: Mapped[str] = mapped_column(String(20))
    num_rows: Mapped[int | None] = mapped_column(Integer)
    error_code: Mapped[str | None] = mapped_column(String(50))
    error_message: Mapped[str | None] = mapped_column(Text)
    path: Mapped[str | None] = mapped_column(Text)
    # Its two output files on disk (0 until it succeeds).
    size_bytes: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class StorageReservation(Base):
    """Bytes an upload in progress holds against its tenant's stored-bytes limit
    (swav_service/quota.py). Deleted when the upload ends; one whose API process died
    stops counting at `expires_at`."""

    __tablename__ = "storage_reservations"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Weights(Base):
    """An uploaded safetensors file of weights that jobs may start from (`path` under the
    artifacts folder, swav_service/layout.py); its bytes count against the tenant's limit."""

    __tablename__ = "weights"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str] = mapped_column(String(200))
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    num_tensors: Mapped[int] = mapped_column(Integer)
    # The 'backbone' the file's metadata names (our exports record it), if any.
    backbone: Mapped[str | None] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_hash: Mapped[str] = mapped_column(String(64))
    status_code: Mapped[int] = mapped_column(Integer)
    response: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class ApiKey(Base):
    """A tenant's API key: only its sha256 is kept; `prefix` finds the row and is shown in
    listings (it is the key's first characters, not enough to use it)."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("prefix", name="uq_api_keys_prefix"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(20))
    key_hash: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
