"""A tenant's rows by id, as every route needs them: the row, or the API's 404.

Each lookup is scoped to the tenant, so another tenant's id reads as missing (404, never
403: ids are not confirmed to exist). The routes, the embedding service and the
dashboard's explorer share these, instead of importing them from each other's route
modules. `stored_path` finds a checkpoint's file, fetched from the S3 store if needed.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import not_found
from swav_service.models import DELETED_DATASET, Checkpoint, Dataset, EmbeddingJob, Job
from swav_service.settings import Settings
from swav_service.storage import artifact_store


def find_job(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job, or ApiError 404 (param job_id)."""
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant == tenant))
    if job is None:
        raise not_found("job", "job_id", job_id)
    return job


def find_dataset(session: Session, tenant: str, dataset_id: str, lock: bool = False) -> Dataset:
    """The tenant's visible dataset, or ApiError 404 (param dataset_id). A deleted one
    (kept for the finished jobs that refer to it) is not visible. `lock`: SELECT ... FOR
    UPDATE, for a caller that changes the row."""
    statement = select(Dataset).where(
        Dataset.id == dataset_id, Dataset.tenant == tenant, Dataset.status != DELETED_DATASET
    )
    row = session.scalar(statement.with_for_update() if lock else statement)
    if row is None:
        raise not_found("dataset", "dataset_id", dataset_id)
    return row


def find_checkpoint(session: Session, tenant: str, checkpoint_id: str) -> Checkpoint:
    """A checkpoint of one of the tenant's jobs, or ApiError 404 (param checkpoint_id)."""
    row = session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.id == checkpoint_id, Job.tenant == tenant)
    )
    if row is None:
        raise not_found("checkpoint", "checkpoint_id", checkpoint_id)
    return row


def find_embedding_job(session: Session, tenant: str, embedding_job_id: str) -> EmbeddingJob:
    """The tenant's embedding job, or ApiError 404 (param embedding_job_id)."""
    row = session.scalar(
        select(EmbeddingJob).where(
            EmbeddingJob.id == embedding_job_id, EmbeddingJob.tenant == tenant
        )
    )
    if row is None:
        raise not_found("embedding job", "embedding_job_id", embedding_job_id)
    return row


def stored_path(settings: Settings, row: Checkpoint) -> Path | None:
    """The checkpoint file under the artifacts folder, or None if it is not there. With
    an S3 store (swav_service/storage.py), a file this machine lacks is fetched from it first."""
    root = settings.artifacts
    path = (root / row.path).resolve()
    if not path.is_relative_to(root) or not artifact_store(settings).fetch(path):
        return None
    return path
