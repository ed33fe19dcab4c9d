"""Uploaded weights: a safetensors file per upload that jobs may start from
(`start_from.weights_id`), with list, read and delete.

The body is the raw file (any Content-Type but multipart), streamed to a temporary name
under `<artifacts>/weights/` and counted against `SWAV_MAX_WEIGHTS_BYTES` and the bytes
the tenant has left (413 / 403 as soon as either is passed). Its bytes are reserved before
they are written (api/upload_hold.py), so a concurrent upload of the tenant sees them as
taken. Its header is then checked without torch (swav_core/safetensors_header.py: 422
`invalid_weights` naming the problem and the expected format), and the row takes the
reservation over under the tenant's lock. Whether the tensors fit a job's model is
checked when the job runs (swav_core/start_weights.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from functools import partial
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.body_limits import capped_stream
from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.limits import storage_error
from api.lookups import find_weights
from api.openapi import BINARY
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.responses import STORAGE_LIMIT
from api.schemas.artifacts import WeightsListPublic, WeightsPublic
from api.upload_hold import RESERVE_STEP, UploadHold, declared_bytes, upload_cap
from swav_core.safetensors_header import SafetensorsFormatError, read_header
from swav_service import quota
from swav_service.layout import weights_path
from swav_service.models import Weights, new_id
from swav_service.quota import human_bytes, lock_tenant, stored_bytes
from swav_service.settings import Settings
from swav_service.storage import StorageError, artifact_store

log = logging.getLogger(__name__)
FLUSH_BYTES = 1 << 20
router = APIRouter(prefix="/v1/weights", tags=["weights"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": BINARY}},
        "description": "The .safetensors file itself (not multipart).",
    }
}


def _too_large(cap: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the weights file is over the {human_bytes(cap)} limit ({cap} bytes, "
        "SWAV_MAX_WEIGHTS_BYTES); upload the backbone's state dict alone",
    )


@router.post(
    "",
    status_code=201,
    response_model=WeightsPublic,
    openapi_extra=UPLOAD_BODY,
    responses={
        **STORAGE_LIMIT,
        413: {"description": "Larger than SWAV_MAX_WEIGHTS_BYTES (`payload_too_large`)."},
        415: {"description": "A multipart body: send the file itself."},
        422: {"description": "Not a safetensors file (`invalid_weights`), or a bad name."},
        503: {"description": "The artifact store did not take the file."},
    },
)
async def upload_weights(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    name: Annotated[str, Query(min_length=1, max_length=200)] = "weights",
) -> WeightsPublic:
    """Upload a safetensors state dict (e.g. a backbone export, or torchvision or timm
    weights) as the raw body; jobs start from it with `start_from.weights_id`."""
    if request.headers.get("content-type", "").lower().startswith("multipart/"):
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the .safetensors file itself as the body (application/octet-stream), "
            "not a multipart form",
        )
    allowed = await run_in_threadpool(
        upload_cap, session, settings, tenant, settings.max_weights_bytes,
        partial(_too_large, settings.max_weights_bytes),
    )
    weights_id = new_id("wts")
    path = weights_path(settings, weights_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial_file = path.with_name(f".{path.name}.part")
    digest = hashlib.sha256()
    # Held from admission until the row counts the file (api/upload_hold.py).
    hold = UploadHold(session, settings, tenant, allowed.nbytes)
    try:
        length = request.headers.get("content-length", "")
        await run_in_threadpool(hold.grow, declared_bytes(length, allowed.nbytes))
        with open(partial_file, "wb") as out:
            pending, written = bytearray(), 0

            async def flush() -> None:
                """Reserve, then write, off the event loop: the file never passes the hold."""
                nonlocal written
                await run_in_threadpool(hold.grow, written + len(pending), RESERVE_STEP)
                await run_in_threadpool(out.write, bytes(pending))
                written += len(pending)
                pending.clear()

            body = capped_stream(
                request, allowed.nbytes, lambda _cap: allowed.too_large(),
                "the upload was interrupted",
            )
            async for chunk in body:
                digest.update(chunk)
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    await flush()
            await flush()
        try:
            header = await run_in_threadpool(read_header, partial_file)
        except SafetensorsFormatError as exc:
            raise ApiError(422, "invalid_weights", f"the upload is not usable: {exc}") from exc
        size = partial_file.stat().st_size
        os.replace(partial_file, path)
        row = Weights(
            id=weights_id, tenant=tenant, name=name, size_bytes=size,
            path=str(path.relative_to(settings.artifacts)), sha256=digest.hexdigest(),
            num_tensors=len(header.tensors), backbone=header.metadata.get("backbone"),
        )
        await run_in_threadpool(_store, session, settings, row, path, hold)
    except BaseException:
        partial_file.unlink(missing_ok=True)
        path.unlink(missing_ok=True)
        await run_in_threadpool(hold.drop)
        raise
    return WeightsPublic.from_row(row)


def _store(
    session: Session, settings: Settings, row: Weights, path: Path, hold: UploadHold
) -> None:
    """The file to the artifact store (a no-op without one, so any worker can fetch it),
    then the row in place of the upload's reservation, under the tenant's lock, if its
    other stored bytes still leave room (a reservation left to expire no longer counts)."""
    store = artifact_store(settings)
    try:
        store.upload(path)
    except StorageError as exc:
        raise ApiError(
            503, "storage_unavailable",
            "the artifact store could not take the file; upload it again later",
        ) from exc
    try:
        lock_tenant(session, row.tenant)
        limit = settings.tenant_max_stored_bytes
        used = stored_bytes(session, row.tenant, except_reservation=hold.reservation_id).total
        if limit and used + row.size_bytes > limit:
            raise storage_error(used, limit, max(0, limit - used))
        session.add(row)
        quota.release(session, hold.reservation_id)
        session.commit()
    except BaseException:
        session.rollback()
        with contextlib.suppress(StorageError):
            store.delete(path)
        raise


@router.get("", response_model=WeightsListPublic)
def list_weights(
    session: SessionDep, tenant: TenantDep, limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> WeightsListPublic:
    """The tenant's uploaded weights, newest first."""
    statement = select(Weights).where(Weights.tenant == tenant)
    rows, next_cursor = paginate(session, statement, Weights, limit, cursor)
    return WeightsListPublic(
        data=[WeightsPublic.from_row(r) for r in rows], next_cursor=next_cursor
    )


@router.get("/{weights_id}", response_model=WeightsPublic)
def get_weights(weights_id: str, session: SessionDep, tenant: TenantDep) -> WeightsPublic:
    return WeightsPublic.from_row(find_weights(session, tenant, weights_id, "weights_id"))


@router.delete("/{weights_id}", status_code=204)
def delete_weights(
    weights_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Delete the file and its row. A queued job that starts from it fails with
    `invalid_weights` when it runs; a job already past its start keeps its checkpoints."""
    row = find_weights(session, tenant, weights_id, "weights_id")
    path = settings.artifacts / row.path
    session.delete(row)
    session.commit()
    path.unlink(missing_ok=True)
    try:
        artifact_store(settings).delete(path)
    except StorageError:  # the row is gone, so nothing refers to the copy any more
        log.warning("weights %s: its copy in the artifact store was not removed", weights_id)
    return Response(status_code=204)
