"""Which index of a job's dataset a request of the explorer reads, and reading it.

The index for a checkpoint is the newest batch embedding job of the dataset with the
backbone's L2-normalised features (`INDEX_LAYER`) whose files are on disk; while none is,
a queued or running one is reported (indexing), and when there is none at all one is
queued here (`api.batch_embedding`). Its files are loaded once per API process into the
`IndexCache` kept on the app (`api.dashboard.index`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fastapi import Request
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.batch_embedding import queue_embedding_job
from api.dashboard.index import ExplorerIndex, IndexCache, load_index
from api.errors import ApiError
from api.lookups import find_job, pick_checkpoint, ready_dataset, stored_path
from api.schemas.artifacts import EmbeddingJobCreate
from api.schemas.common import Layer
from swav_service.db import get_sessionmaker
from swav_service.layout import EMBEDDINGS_FILE, INDEX_FILE
from swav_service.models import EmbeddingJob
from swav_service.settings import Settings

INDEX_LAYER: Layer = "backbone"  # what kNN evaluation uses; unit rows make cosine a dot product


def index_cache(request: Request) -> IndexCache:
    """The API process's cache of loaded indexes, made on first use and kept on the app."""
    cache: IndexCache | None = getattr(request.app.state, "explorer_indexes", None)
    if cache is None:
        cache = IndexCache()
        request.app.state.explorer_indexes = cache
    return cache


def _files_present(settings: Settings, row: EmbeddingJob) -> Path | None:
    """The embedding job's folder under the artifacts folder, when both files are there."""
    if row.path is None:
        return None
    root = settings.artifacts
    folder = (root / row.path).resolve()
    if not folder.is_relative_to(root):
        return None
    if (folder / EMBEDDINGS_FILE).is_file() and (folder / INDEX_FILE).is_file():
        return folder
    return None


@dataclass(frozen=True)
class Located:
    """A request's index: its checkpoint and embedding job, and the files once ready."""

    job_id: str
    labelled: bool  # the dataset has class folders: labels are the first path component
    checkpoint_id: str
    embedding_job_id: str
    folder: Path | None  # None while the embedding job is queued or running
    model_path: Path | None  # the checkpoint file, None if it left the disk meanwhile


def _locate_in(
    session: Session, settings: Settings, tenant: str, job_id: str, checkpoint_id: str | None
) -> Located:
    """The index of the job's dataset for the checkpoint, queued now if there is none.

    The newest matching embedding job whose files are on disk wins; else a queued or
    running one (folder None: indexing); else, when the newest one failed, 409
    `index_failed` with its reason (a new `POST /v1/jobs/{id}/embeddings` retries it, and
    is picked up here); else (none, or their files removed) a new embedding job.
    """
    job = find_job(session, tenant, job_id)
    checkpoint = pick_checkpoint(session, settings, job, checkpoint_id)
    dataset = ready_dataset(session, tenant, job.dataset_id)
    rows = session.scalars(
        select(EmbeddingJob)
        .where(
            EmbeddingJob.tenant == tenant,
            EmbeddingJob.checkpoint_id == checkpoint.id,
            EmbeddingJob.dataset_id == dataset.id,
            EmbeddingJob.layer == INDEX_LAYER,
            EmbeddingJob.normalize.is_(True),
        )
        .order_by(EmbeddingJob.created_at.desc(), EmbeddingJob.id.desc())
    ).all()
    model_path = stored_path(settings, checkpoint)

    def located(embedding_job_id: str, folder: Path | None) -> Located:
        labelled = bool(dataset.classes)
        return Located(job.id, labelled, checkpoint.id, embedding_job_id, folder, model_path)

    for row in rows:
        folder = _files_present(settings, row) if row.status == "succeeded" else None
        if folder is not None:
            return located(row.id, folder)
    for row in rows:
        if row.status in ("queued", "running"):
            return located(row.id, None)
    if rows and rows[0].status == "failed":
        raise ApiError(
            409,
            "index_failed",
            f"embedding job {rows[0].id}, the index of checkpoint {checkpoint.id}, failed: "
            f"{rows[0].error_message or rows[0].error_code}; POST /v1/jobs/{job.id}/embeddings "
            f'with {{"checkpoint_id": "{checkpoint.id}"}} to try again',
            "checkpoint_id",
        )
    created = queue_embedding_job(
        session,
        settings,
        tenant,
        job.id,
        EmbeddingJobCreate(checkpoint_id=checkpoint.id, layer=INDEX_LAYER, normalize=True),
    )
    return located(created.id, None)


def locate_index(
    settings: Settings, tenant: str, job_id: str, checkpoint_id: str | None
) -> Located:
    """`_locate_in` a short session of its own: none is held while a request embeds."""
    with get_sessionmaker()() as session:
        return _locate_in(session, settings, tenant, job_id, checkpoint_id)


def read_index(cache: IndexCache, located: Located) -> ExplorerIndex:
    """The located index from the cache, loaded now if needed (call in a worker thread)."""
    folder = located.folder
    assert folder is not None
    try:
        return cache.get(
            located.embedding_job_id,
            lambda: load_index(
                located.embedding_job_id, located.checkpoint_id, folder, located.labelled
            ),
        )
    except (OSError, ValueError) as exc:
        raise ApiError(
            410,
            "index_gone",
            f"the files of embedding job {located.embedding_job_id} were removed or are "
            "unreadable; retry to index the dataset again",
            "checkpoint_id",
        ) from exc
