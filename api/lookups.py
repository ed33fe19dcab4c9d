"""A tenant's rows by id, as the routes need them: the row, or the API's 4xx.

Each lookup is scoped to the tenant, so another tenant's id reads as missing (404, never
403: ids are not confirmed to exist). `ready_dataset` and `pick_checkpoint` also refuse a
dataset not ready to use (409) and a checkpoint whose file is gone (410). `stored_path`
finds a checkpoint's file, fetched from the S3 store if needed. The routes, the embedding
service and the dashboard's explorer share these instead of importing them from each
other's route modules.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from swav_service.db import begin_writing
from swav_service.models import DELETED_DATASET, Checkpoint, Dataset, EmbeddingJob, Job, Weights
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
    UPDATE (on SQLite, the write lock), for a caller that changes the row."""
    statement = select(Dataset).where(
        Dataset.id == dataset_id, Dataset.tenant == tenant, Dataset.status != DELETED_DATASET
    )
    if lock:
        begin_writing(session)
    row = session.scalar(statement.with_for_update() if lock else statement)
    if row is None:
        raise not_found("dataset", "dataset_id", dataset_id)
    return row


def ready_dataset(session: Session, tenant: str, dataset_id: str) -> Dataset:
    """The tenant's dataset (404) if it is ready to use, else ApiError 409
    `dataset_not_ready`."""
    dataset = find_dataset(session, tenant, dataset_id)
    if dataset.status != "ready":
        raise ApiError(
            409,
            "dataset_not_ready",
            f"dataset {dataset_id} is {dataset.status}; wait until it is ready",
            "dataset_id",
        )
    return dataset


def tenant_checkpoint(session: Session, tenant: str, checkpoint_id: str) -> Checkpoint | None:
    """A checkpoint of one of the tenant's jobs, or None."""
    return session.scalar(
        select(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Checkpoint.id == checkpoint_id, Job.tenant == tenant)
    )


def find_checkpoint(session: Session, tenant: str, checkpoint_id: str) -> Checkpoint:
    """A checkpoint of one of the tenant's jobs, or ApiError 404 (param checkpoint_id)."""
    row = tenant_checkpoint(session, tenant, checkpoint_id)
    if row is None:
        raise not_found("checkpoint", "checkpoint_id", checkpoint_id)
    return row


def checkpoint_gone(checkpoint_id: str) -> ApiError:
    """410 `checkpoint_gone`: the checkpoint's row exists but its file left the disk."""
    return ApiError(
        410,
        "checkpoint_gone",
        f"checkpoint {checkpoint_id} is no longer on disk (pruned or removed); "
        "use a newer checkpoint of the job, or omit checkpoint_id for its latest one",
        "checkpoint_id",
    )


def pick_checkpoint(
    session: Session, settings: Settings, job: Job, checkpoint_id: str | None
) -> Checkpoint:
    """The named checkpoint of `job` (404 / 410), or its latest one on disk (409)."""
    if checkpoint_id is not None:
        row = session.scalar(
            select(Checkpoint).where(Checkpoint.id == checkpoint_id, Checkpoint.job_id == job.id)
        )
        if row is None:
            raise not_found(f"checkpoint of job {job.id}", "checkpoint_id", checkpoint_id)
        if not row.available or stored_path(settings, row) is None:
            raise checkpoint_gone(checkpoint_id)
        return row
    latest = latest_stored_checkpoint(session, settings, job)
    if latest is None:
        raise model_not_ready(job, "checkpoint_id")
    return latest[0]


def latest_stored_checkpoint(
    session: Session, settings: Settings, job: Job
) -> tuple[Checkpoint, Path] | None:
    """The job's final checkpoint, else its highest step, among those whose file is
    there (fetched from the S3 store if needed), with that file; None if there is none."""
    rows = session.scalars(
        select(Checkpoint)
        .where(Checkpoint.job_id == job.id, Checkpoint.available.is_(True))
        .order_by(Checkpoint.final.desc(), Checkpoint.step.desc(), Checkpoint.created_at.desc())
    )
    for row in rows:
        path = stored_path(settings, row)
        if path is not None:
            return row, path
    return None


def model_not_ready(job: Job, param: str) -> ApiError:
    """409 `model_not_ready`: the job has written no checkpoint that is still on disk."""
    return ApiError(
        409,
        "model_not_ready",
        f"job {job.id} ({job.status}) has no checkpoint available yet; retry once it has "
        "written one (see GET /v1/jobs/{job_id}/checkpoints)",
        param,
    )


def find_weights(session: Session, tenant: str, weights_id: str, param: str) -> Weights:
    """The tenant's uploaded weights, or ApiError 404 naming `param`."""
    row = session.scalar(select(Weights).where(Weights.id == weights_id, Weights.tenant == tenant))
    if row is None:
        raise not_found("weights", param, weights_id)
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
