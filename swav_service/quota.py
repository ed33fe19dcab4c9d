"""The tenant's stored bytes and the admission of new ones against
`tenant_max_stored_bytes`, shared by the API (uploads, jobs, embeddings) and the workers
(ingestion, training).

What counts is what the tenant keeps on disk, as the database records it: the archives
and extracted images of its datasets (every status but `deleted`), its checkpoints still
on disk with their sidecars and safetensors exports, its finished embedding files, its
uploaded weights files, and the reservations of its uploads in progress. One query adds
them up (`stored_bytes`).

A check and the write it admits must not interleave with another tenant-mate's, or two
uploads that each fit alone would both pass: `lock_tenant` serialises them, and an upload
holds its bytes in a `StorageReservation` from admission until its dataset row replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session

from swav_service.db import begin_writing
from swav_service.models import (
    DELETED_DATASET,
    Checkpoint,
    Dataset,
    EmbeddingJob,
    Job,
    StorageReservation,
    Weights,
    new_id,
    utcnow,
)
from swav_service.settings import Settings

# An upload renews its reservation while it streams; one whose API process died stops
# counting this long after its last renewal.
RESERVATION_TTL_S = 600.0
RESERVATION_RENEW_S = 60.0
LIMIT_SETTING = "SWAV_TENANT_MAX_STORED_BYTES"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


def folder_bytes(folder: Path) -> int:
    """The bytes of the regular files under `folder` (what a worker records it stores)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@dataclass(frozen=True)
class StoredBytes:
    """A tenant's stored bytes by kind; `total` is what the limit is checked against."""

    archives: int
    images: int
    checkpoints: int
    embeddings: int
    reserved: int
    weights: int

    @property
    def total(self) -> int:
        return (
            self.archives + self.images + self.checkpoints + self.embeddings + self.reserved
            + self.weights
        )


class StorageLimitExceeded(Exception):
    """Storing more would take the tenant past its limit; the message names the usage,
    the limit and its setting."""

    code = "storage_limit_exceeded"

    def __init__(self, used: int, limit: int, what: str | None = None) -> None:
        self.used, self.limit = used, limit
        super().__init__(storage_message(used, limit, what))


def storage_message(used: int, limit: int, what: str | None = None) -> str:
    """'the tenant stores X[; WHAT is larger than the Y left]; the limit is Z (N bytes,
    SWAV_TENANT_MAX_STORED_BYTES): ...'."""
    over = f"; {what} is larger than the {human_bytes(max(0, limit - used))} left" if what else ""
    return (
        f"the tenant stores {human_bytes(used)}{over}; the limit is {human_bytes(limit)} "
        f"({limit} bytes, {LIMIT_SETTING}): delete datasets you no longer need"
    )


def lock_tenant(session: Session, tenant: str) -> None:
    """Serialise this transaction with the tenant's other limit checks until it ends.

    PostgreSQL: a transaction-scoped advisory lock on the tenant. SQLite: the database's
    write lock, taken before anything is read (`begin_writing`); expired reservations
    are dropped under it.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": tenant})
    else:
        begin_writing(session)
        session.execute(delete(StorageReservation).where(StorageReservation.expires_at < utcnow()))


def record_dataset_bytes(
    session: Session, settings: Settings, dataset: Dataset, nbytes: int, what: str
) -> str | None:
    """Count `nbytes` as the dataset's stored images (with its prepared copy, once made),
    unless that takes its tenant past the limit: then why not, naming `what`. Under the
    tenant's lock, so two datasets counted at once cannot both take the last bytes."""
    lock_tenant(session, dataset.tenant)
    limit = settings.tenant_max_stored_bytes
    used = stored_bytes(session, dataset.tenant).total - dataset.images_bytes
    if limit and used + nbytes > limit:
        return storage_message(used, limit, what)
    dataset.images_bytes = nbytes
    return None


def stored_bytes(
    session: Session, tenant: str, *, except_reservation: str | None = None
) -> StoredBytes:
    """What the tenant stores, by kind, in one query (`except_reservation` left out)."""
    datasets = (Dataset.tenant == tenant, Dataset.status != DELETED_DATASET)
    reservations = [StorageReservation.tenant == tenant, StorageReservation.expires_at >= utcnow()]
    if except_reservation is not None:
        reservations.append(StorageReservation.id != except_reservation)

    def total(column: Any, *where: Any, join: tuple[Any, Any] | None = None) -> Any:
        query = select(func.coalesce(func.sum(column), 0))
        if join is not None:
            query = query.join(*join)
        return query.where(*where).scalar_subquery()

    row = session.execute(
        select(
            total(Dataset.archive_bytes, *datasets),
            total(Dataset.images_bytes, *datasets),
            total(
                Checkpoint.size_bytes + Checkpoint.extra_bytes,
                Job.tenant == tenant,
                Checkpoint.available.is_(True),
                join=(Job, Job.id == Checkpoint.job_id),
            ),
            total(
                EmbeddingJob.size_bytes,
                EmbeddingJob.tenant == tenant,
                EmbeddingJob.status == "succeeded",
            ),
            total(StorageReservation.bytes, *reservations),
            total(Weights.size_bytes, Weights.tenant == tenant),
        )
    ).one()
    return StoredBytes(*(int(value) for value in row))


def over_limit(session: Session, settings: Settings, tenant: str) -> StoredBytes | None:
    """The tenant's stored bytes if they are past its limit, else None (also: no limit)."""
    limit = settings.tenant_max_stored_bytes
    if not limit:
        return None
    used = stored_bytes(session, tenant)
    return used if used.total > limit else None


def reserve(
    session: Session,
    settings: Settings,
    tenant: str,
    nbytes: int,
    reservation_id: str | None = None,
) -> str | None:
    """Hold `nbytes` for an upload (a new reservation, or `reservation_id` resized and
    renewed) and commit; its id, or None when the tenant has no limit.

    Raises StorageLimitExceeded, committing nothing, when the tenant's other stored bytes
    plus `nbytes` pass the limit (or reach it, for `nbytes` 0: nothing more fits).
    """
    limit = settings.tenant_max_stored_bytes
    if not limit:
        return None
    try:
        lock_tenant(session, tenant)
        used = stored_bytes(session, tenant, except_reservation=reservation_id).total
        if used + nbytes > limit or used >= limit:
            raise StorageLimitExceeded(used, limit, "this upload" if nbytes else None)
        expires_at = utcnow() + timedelta(seconds=RESERVATION_TTL_S)
        row = session.get(StorageReservation, reservation_id) if reservation_id else None
        if row is None:
            row = StorageReservation(id=reservation_id or new_id("res"), tenant=tenant)
            session.add(row)
        row.bytes, row.expires_at = nbytes, expires_at
        session.commit()
    except BaseException:
        session.rollback()
        raise
    return row.id


def release(session: Session, reservation_id: str | None) -> None:
    """Drop a reservation (in the caller's transaction; the caller commits)."""
    if reservation_id is not None:
        session.execute(delete(StorageReservation).where(StorageReservation.id == reservation_id))
