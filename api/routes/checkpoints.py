"""Checkpoints of a job, and their download as the training state or as exports.

`full` is the stored training checkpoint (.pt, loads with `torch.load(weights_only=True)`),
streamed from the S3 store when there is one (swav_service/storage.py). The exports, each
loading where its users work (swav_core/export_formats.py says which apply to a backbone,
swav_core/exports.py how each loads): `safetensors` (the whole SwAV model, its config in
the metadata), `backbone` (our own and torchvision backbones, strict into torchvision),
`timm` (timm backbones, for `timm.create_model(checkpoint_path=...)`) and `onnx`. A format
that does not apply to the job's backbone is a 422 naming those that do. Each export is
made on first request, next to the checkpoint (`<name>.model.safetensors`, `<name>.onnx`,
...), and reused. The export writes atomically, so concurrent first requests are safe, and
its bytes count against the tenant's stored-bytes limit with the checkpoint
(`extra_bytes`). torch is imported only when an export is made, so the API starts without
it.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import FileResponse, Response, StreamingResponse
from sqlalchemy import select

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.lookups import find_checkpoint, find_job, stored_path
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.schemas.artifacts import CheckpointPublic, CheckpointsPublic
from swav_core.checkpoint_names import beside_paths, export_path
from swav_core.errors import CheckpointError
from swav_core.export_formats import EXPORT_SUFFIX, FORMATS, format_problem
from swav_service.models import Checkpoint
from swav_service.storage import artifact_store

router = APIRouter(tags=["checkpoints"])


class DownloadFormat(StrEnum):
    full = "full"
    safetensors = "safetensors"
    backbone = "backbone"
    timm = "timm"
    onnx = "onnx"


assert tuple(DownloadFormat) == FORMATS


@router.get("/v1/jobs/{job_id}/checkpoints", response_model=CheckpointsPublic)
def list_checkpoints(
    job_id: str,
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
    include_pruned: Annotated[
        bool, Query(description="Also list pruned checkpoints (their metrics and quality).")
    ] = False,
) -> CheckpointsPublic:
    """The job's checkpoints still on disk, newest first (older ones are pruned)."""
    find_job(session, tenant, job_id)
    statement = select(Checkpoint).where(Checkpoint.job_id == job_id)
    if not include_pruned:
        statement = statement.where(Checkpoint.available.is_(True))
    rows, next_cursor = paginate(session, statement, Checkpoint, limit, cursor)
    return CheckpointsPublic(
        data=[CheckpointPublic.from_row(r) for r in rows], next_cursor=next_cursor
    )


@router.get("/v1/checkpoints/{checkpoint_id}", response_model=CheckpointPublic)
def get_checkpoint(checkpoint_id: str, session: SessionDep, tenant: TenantDep) -> CheckpointPublic:
    return CheckpointPublic.from_row(find_checkpoint(session, tenant, checkpoint_id))


def _gone(checkpoint_id: str) -> ApiError:
    return ApiError(
        410,
        "checkpoint_gone",
        f"checkpoint {checkpoint_id} is no longer on disk (pruned or removed); "
        "download a newer checkpoint of the job",
        "checkpoint_id",
    )


def beside_bytes(checkpoint: Path) -> int:
    """The bytes of the files kept beside a checkpoint: its sidecar and its exports (set,
    not added, so that concurrent first exports count once)."""
    return sum(p.stat().st_size for p in beside_paths(checkpoint) if p.is_file())


def export(checkpoint: Path, fmt: DownloadFormat) -> Path:
    """The cached export of `checkpoint` in `fmt`, made now if missing (imports torch)."""
    target = export_path(checkpoint, fmt)
    if target.is_file():
        return target
    from swav_core.exports import load_model, write_export
    from swav_core.onnx_export import OnnxExportError

    model, config = load_model(checkpoint)
    try:
        write_export(model, config, fmt.value, target)
    except OnnxExportError as exc:  # the reasons name torch's internals: not for the client
        raise ApiError(
            422,
            "export_unsupported",
            f"backbone {config.backbone!r} cannot be exported to ONNX by torch's exporters; "
            "download 'safetensors' or the backbone's weights "
            f"('{'timm' if config.backbone.startswith('timm/') else 'backbone'}') instead",
            "format",
        ) from exc
    return target


@router.get(
    "/v1/checkpoints/{checkpoint_id}/download",
    response_class=FileResponse,
    responses={
        200: {
            "content": {"application/octet-stream": {}},
            "description": "The file; `X-Checksum-SHA256` holds its sha256.",
        },
        410: {"description": "The file was pruned (`checkpoint_gone`)."},
        422: {
            "description": "`invalid_request`: the format does not apply to the job's "
            "backbone (the message names those that do); `export_unsupported`: torch cannot "
            "export this backbone to ONNX."
        },
    },
)
def download_checkpoint(
    checkpoint_id: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    format: Annotated[
        DownloadFormat,
        Query(
            description="full: training state (.pt); safetensors: the whole model; backbone: "
            "our own and torchvision backbones, for torchvision (strict load_state_dict); "
            "timm: timm backbones, for timm.create_model(checkpoint_path=...); onnx: the "
            "backbone, images N x 3 x S x S -> features N x F. The checkpoint's "
            "`export_formats` lists those that apply."
        ),
    ] = DownloadFormat.full,
) -> Response:
    row = find_checkpoint(session, tenant, checkpoint_id)
    backbone = str(find_job(session, tenant, row.job_id).config.get("backbone", ""))
    problem = format_problem(backbone, format.value)
    if problem is not None:
        raise ApiError(422, "invalid_request", problem, "format")
    stem = f"{row.job_id}-{Path(row.path).stem}"
    store = artifact_store(settings)
    if store.remote and format is DownloadFormat.full:
        opened = store.stream(settings.artifacts / row.path) if row.available else None
        if opened is None:
            raise _gone(checkpoint_id)
        size, chunks = opened
        return StreamingResponse(
            chunks,
            media_type="application/octet-stream",
            headers={
                "Content-Length": str(size),
                "Content-Disposition": f'attachment; filename="{stem}.pt"',
                "X-Checksum-SHA256": row.sha256,
            },
        )
    path = stored_path(settings, row) if row.available else None
    if path is None:
        raise _gone(checkpoint_id)
    if format is DownloadFormat.full:
        return FileResponse(
            path,
            media_type="application/octet-stream",
            filename=f"{stem}.pt",
            headers={"X-Checksum-SHA256": row.sha256},
        )
    try:
        exported = export(path, format)
    except CheckpointError as exc:
        if not path.is_file():  # pruned while we were reading it
            raise _gone(checkpoint_id) from exc
        raise ApiError(
            500,
            "checkpoint_failed",
            f"checkpoint {checkpoint_id} cannot be exported: its file does not verify or load",
            "checkpoint_id",
        ) from exc
    row.extra_bytes = beside_bytes(path)  # the export counts against the tenant's storage
    session.commit()
    from swav_core.checkpoint import file_sha256  # torch loads only when a download needs it

    return FileResponse(
        exported,
        media_type="application/octet-stream",
        filename=f"{stem}{EXPORT_SUFFIX[format]}",
        headers={"X-Checksum-SHA256": file_sha256(exported)},
    )
