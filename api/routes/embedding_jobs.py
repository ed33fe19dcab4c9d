"""Batch embeddings of a whole dataset with one checkpoint, and checkpoint quality reports.

`POST /v1/jobs/{job_id}/embeddings` queues an embedding job (short queue): every valid
image of the dataset (default: the job's) through the checkpoint (default: the job's
latest available one, final preferred). Once `succeeded`,
`GET /v1/embedding-jobs/{id}/download?file=embeddings` is a float32 `.npy` of shape
(N, D), and `?file=index` a JSON list of the N image paths relative to the dataset root,
row i being the image at index[i]. The order is that of
`swav_core.image_folder.scan_image_folder(...).files`: the valid images' relative POSIX paths
sorted as strings (so `class/name` groups by class folder).

`POST /v1/checkpoints/{id}/evaluate` queues the checkpoint's quality report (kNN and
linear-probe top-1 of its backbone on the job's labelled dataset); it shows as `quality`
in the checkpoint listing once computed. The training worker requests it for every
checkpoint of a job whose dataset has classes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse

from api.batch_embedding import queue_embedding_job
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.limits import evaluation_in_flight, short_tasks_left
from api.lookups import (
    checkpoint_gone,
    find_checkpoint,
    find_embedding_job,
    ready_dataset,
    stored_path,
)
from api.responses import BROKER_UNAVAILABLE, CHECKPOINT_GONE, STORAGE_LIMIT, TOO_MANY_TASKS
from api.schemas.artifacts import CheckpointPublic, EmbeddingJobCreate, EmbeddingJobPublic
from swav_service.dispatch import enqueue_evaluation
from swav_service.job_state import evaluation_request
from swav_service.layout import EMBEDDINGS_FILE, INDEX_FILE
from swav_service.models import Job
from swav_service.quota import lock_tenant

router = APIRouter(tags=["embedding jobs"])


@router.post(
    "/v1/jobs/{job_id}/embeddings",
    status_code=202,
    response_model=EmbeddingJobPublic,
    responses={
        **STORAGE_LIMIT,
        404: {"description": "No such job, checkpoint (of this job) or dataset."},
        409: {"description": "No checkpoint yet (`model_not_ready`), or the dataset is not "
              "ready (`dataset_not_ready`)."},
        **CHECKPOINT_GONE,
        **TOO_MANY_TASKS,
        **BROKER_UNAVAILABLE,
    },
)
def create_embedding_job(
    job_id: str,
    payload: EmbeddingJobCreate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
) -> EmbeddingJobPublic:
    """Embed every valid image of a dataset with one of the job's checkpoints (async); the
    same request while one is queued or running answers that one."""
    return EmbeddingJobPublic.from_row(
        queue_embedding_job(session, settings, tenant, job_id, payload)
    )


@router.get("/v1/embedding-jobs/{embedding_job_id}", response_model=EmbeddingJobPublic)
def get_embedding_job(
    embedding_job_id: str, session: SessionDep, tenant: TenantDep
) -> EmbeddingJobPublic:
    return EmbeddingJobPublic.from_row(find_embedding_job(session, tenant, embedding_job_id))


@router.get(
    "/v1/embedding-jobs/{embedding_job_id}/download",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}, "application/json": {}},
            "description": "embeddings: float32 .npy (N x D); index: JSON list of the N "
            "relative image paths, sorted (scan_image_folder order), row i = index[i].",
        },
        409: {"description": "The embedding job has not succeeded (`embeddings_not_ready`)."},
    },
)
def download_embeddings(
    embedding_job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    file: Annotated[
        Literal["embeddings", "index"],
        Query(description="embeddings: the .npy matrix; index: the image paths."),
    ] = "embeddings",
) -> FileResponse:
    row = find_embedding_job(session, tenant, embedding_job_id)
    if row.status != "succeeded" or row.path is None:
        raise ApiError(
            409,
            "embeddings_not_ready",
            f"embedding job {row.id} is {row.status}; download once it has succeeded",
            "embedding_job_id",
        )
    name = EMBEDDINGS_FILE if file == "embeddings" else INDEX_FILE
    root = settings.artifacts
    path = (root / row.path / name).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise ApiError(
            410, "embeddings_gone", f"the files of embedding job {row.id} were removed",
            "embedding_job_id",
        )
    media = "application/octet-stream" if file == "embeddings" else "application/json"
    return FileResponse(path, media_type=media, filename=f"{row.id}-{Path(name).name}")


@router.post(
    "/v1/checkpoints/{checkpoint_id}/evaluate",
    status_code=202,
    response_model=CheckpointPublic,
    responses={
        409: {"description": "The job's dataset has no classes (`dataset_unlabelled`)."},
        **CHECKPOINT_GONE,
        **TOO_MANY_TASKS,
    },
)
def evaluate_checkpoint(
    checkpoint_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> CheckpointPublic:
    """Queue the checkpoint's quality report on its job's dataset (needs class folders);
    `quality` appears on the checkpoint once computed. Asked again while one is in flight,
    it queues nothing more."""
    lock_tenant(session, tenant)  # the in-flight check and the request stay one step
    row = find_checkpoint(session, tenant, checkpoint_id)
    if not row.available or stored_path(settings, row) is None:
        raise checkpoint_gone(checkpoint_id)
    job = session.get(Job, row.job_id)
    assert job is not None
    dataset = ready_dataset(session, tenant, job.dataset_id)
    if not dataset.classes:
        raise ApiError(
            409,
            "dataset_unlabelled",
            f"dataset {dataset.id} has no classes (one subfolder per class); a quality "
            "report needs labels",
            "checkpoint_id",
        )
    if evaluation_in_flight(row, settings):
        return CheckpointPublic.from_row(row)  # asked again: the one in flight answers
    short_tasks_left(session, settings, tenant)
    for column, value in evaluation_request().items():
        setattr(row, column, value)
    session.commit()
    try:
        enqueue_evaluation(row.id)
    except Exception as exc:
        row.evaluation_requested_at = None
        session.commit()
        raise ApiError(
            503, "broker_unavailable", "the task broker was unreachable; retry later"
        ) from exc
    return CheckpointPublic.from_row(row)
