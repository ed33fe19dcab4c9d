"""Which checkpoint the `model` of an embeddings request names, and its file.

`model` is a checkpoint id, or a job id meaning that job's latest checkpoint still on
disk (final preferred, else the highest step), always within the request's tenant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError
from api.lookups import latest_stored_checkpoint, model_not_ready, stored_path, tenant_checkpoint
from swav_service.models import Job
from swav_service.settings import Settings


@dataclass(frozen=True)
class ResolvedModel:
    """The checkpoint a request's `model` names, and its file under the artifacts folder."""

    checkpoint_id: str
    path: Path


def model_gone(checkpoint_id: str) -> ApiError:
    """410 `checkpoint_gone` for the `model` param: the checkpoint's file left the disk."""
    return ApiError(
        410,
        "checkpoint_gone",
        f"checkpoint {checkpoint_id} is no longer on disk (pruned or removed); "
        "use a newer checkpoint, or the job id for its latest one",
        "model",
    )


def resolve_model(
    session: Session, settings: Settings, tenant: str, identifier: str
) -> ResolvedModel:
    """A checkpoint id as is; a job id as its final checkpoint, else its highest step.

    404 `model_not_found` when neither exists for the tenant, 410 `checkpoint_gone` for a
    pruned checkpoint, 409 `model_not_ready` for a job with no checkpoint on disk yet.
    """
    row = tenant_checkpoint(session, tenant, identifier)
    if row is not None:
        path = stored_path(settings, row) if row.available else None
        if path is None:
            raise model_gone(identifier)
        return ResolvedModel(row.id, path)
    job = session.scalar(select(Job).where(Job.id == identifier, Job.tenant == tenant))
    if job is None:
        raise ApiError(
            404,
            "model_not_found",
            f"no checkpoint or job with id {identifier!r}; pass a checkpoint id "
            "(GET /v1/jobs/{job_id}/checkpoints) or a job id",
            "model",
        )
    latest = latest_stored_checkpoint(session, settings, job)
    if latest is None:
        raise model_not_ready(job, "model")
    checkpoint, path = latest
    return ResolvedModel(checkpoint.id, path)
