"""The checks of a job's `start_from` at submit, where they are cheap (no torch, no tensors).

A checkpoint must be one of the tenant's (else 404, as any other id), still on disk (410
`checkpoint_gone`), and of a run with the job's backbone (422 `invalid_weights`).
Uploaded weights must be the tenant's (404) and, when their metadata names a backbone, the
job's (422). Whether the tensors fit the model is known only once it is built: a file
that does not fails the job with reason `invalid_weights` (swav_core/start_weights.py).
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from api.errors import ApiError, not_found
from api.lookups import checkpoint_gone, find_weights, tenant_checkpoint
from api.schemas.jobs import StartFrom
from swav_core.config import TrainConfig
from swav_service.models import Job
from swav_service.settings import Settings
from swav_service.storage import artifact_store


def _other_backbone(what: str, theirs: str, ours: str, param: str) -> ApiError:
    return ApiError(
        422,
        "invalid_weights",
        f"{what} holds a {theirs!r} backbone and this job's config.backbone is {ours!r}; "
        f"set config.backbone to {theirs!r}, or start from weights of a {ours!r}",
        param,
    )


def _on_disk(settings: Settings, relative: str) -> bool:
    """Whether the file is in the artifacts folder; with an S3 store its row's `available`
    says so already, and the worker fetches it (the API downloads nothing to check)."""
    if artifact_store(settings).remote:
        return True
    path = (settings.artifacts / relative).resolve()
    return path.is_relative_to(settings.artifacts) and path.is_file()


def check_start_from(
    session: Session, settings: Settings, tenant: str, start: StartFrom, config: TrainConfig
) -> tuple[str | None, str | None]:
    """(start_checkpoint_id, start_weights_id) for the job row, or the ApiError to answer."""
    if start.checkpoint_id is not None:
        param = "start_from.checkpoint_id"
        row = tenant_checkpoint(session, tenant, start.checkpoint_id)
        if row is None:
            raise not_found("checkpoint", param, start.checkpoint_id)
        if not row.available or not _on_disk(settings, row.path):
            gone = checkpoint_gone(start.checkpoint_id)
            raise ApiError(gone.status, gone.code, gone.message, param)
        parent = session.get(Job, row.job_id)
        theirs = (parent.config or {}).get("backbone") if parent is not None else None
        if theirs is not None and theirs != config.backbone:
            raise _other_backbone(f"checkpoint {row.id}", theirs, config.backbone, param)
        return row.id, None
    param = "start_from.weights_id"  # StartFrom holds exactly one of the two ids
    weights = find_weights(session, tenant, str(start.weights_id), param)
    if weights.backbone is not None and weights.backbone != config.backbone:
        raise _other_backbone(f"weights {weights.id}", weights.backbone, config.backbone, param)
    return None, weights.id
