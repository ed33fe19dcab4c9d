"""Queueing a batch embedding job: every valid image of a dataset through one checkpoint,
computed by a short worker.

`POST /v1/jobs/{id}/embeddings` queues one, and so does the dashboard's explorer when a
job's map or neighbours need an index that does not exist yet; both go through here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits import short_tasks_left, storage_left
from api.lookups import find_job, pick_checkpoint, ready_dataset
from api.schemas.artifacts import EmbeddingJobCreate
from swav_service.dispatch import enqueue_embedding
from swav_service.models import ACTIVE_EMBEDDING_JOB_STATUSES, EmbeddingJob, new_id
from swav_service.quota import lock_tenant
from swav_service.settings import Settings


def queue_embedding_job(
    session: Session, settings: Settings, tenant: str, job_id: str, payload: EmbeddingJobCreate
) -> EmbeddingJob:
    """Record a queued embedding job and send it to the short queue; returns its row, or
    the queued or running one that computes the same embeddings.

    The dataset defaults to the job's, the checkpoint to the job's latest on disk. Raises
    ApiError 404 / 409 / 410 from the lookups, 403 over the tenant's stored bytes, 429 over
    its short tasks in flight, and 503 `broker_unavailable` (the row is then marked failed)
    when the task cannot be sent.
    """
    lock_tenant(session, tenant)  # the in-flight lookup and the insert stay one step
    job = find_job(session, tenant, job_id)
    checkpoint = pick_checkpoint(session, settings, job, payload.checkpoint_id)
    dataset = ready_dataset(session, tenant, payload.dataset_id or job.dataset_id)
    same = session.scalar(
        select(EmbeddingJob).where(
            EmbeddingJob.tenant == tenant,
            EmbeddingJob.checkpoint_id == checkpoint.id,
            EmbeddingJob.dataset_id == dataset.id,
            EmbeddingJob.layer == payload.layer,
            EmbeddingJob.normalize == payload.normalize,
            EmbeddingJob.status.in_(ACTIVE_EMBEDDING_JOB_STATUSES),
        ).limit(1)
    )
    if same is not None:
        return same  # the same embeddings are already on their way
    storage_left(session, settings, tenant)
    short_tasks_left(session, settings, tenant)
    row = EmbeddingJob(
        id=new_id("emb"),
        tenant=tenant,
        job_id=job.id,
        checkpoint_id=checkpoint.id,
        dataset_id=dataset.id,
        layer=payload.layer,
        normalize=payload.normalize,
        status="queued",
    )
    session.add(row)
    session.commit()  # before the task is sent, so the worker finds the row
    try:
        enqueue_embedding(row.id)
    except Exception as exc:
        row.status = "failed"
        row.error_code = "broker_unavailable"
        row.error_message = "the task broker was unreachable; request the embeddings again"
        session.commit()
        raise ApiError(
            503, "broker_unavailable", f"embedding job {row.id} failed: {row.error_message}"
        ) from exc
    return row
