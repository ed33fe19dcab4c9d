"""Datasets: streamed archive upload, listing, deletion.

An upload is parsed as it arrives (python-multipart's streaming parser on
`request.stream()`) and the `file` part goes straight to
`<artifacts>/datasets/<id>/upload.<ext>`, counting bytes against
`settings.max_upload_bytes`: the body is never held in memory or spooled twice, and an
oversized one is refused at its Content-Length or as soon as the count passes the cap.
The tenant's stored-bytes limit holds under concurrency: at admission the upload reserves
its Content-Length (or, without one, reserves ahead of what it streams) under the tenant's
lock (`UploadHold`, swav_service/quota.py), and its dataset row takes the reservation over.
The worker's `ingest_dataset` then extracts and validates it (status `validating` ->
`ready` or `failed`).

Deleting a dataset removes its files. Its row is removed too, unless finished jobs still
refer to it (their `dataset_id` must stay valid): then the row is kept with status
`deleted`, hidden from every route, so those jobs keep existing but cannot be resumed.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fastapi import APIRouter, Request, Response
from python_multipart.multipart import parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.limits import storage_error, storage_left, storage_refused
from api.lookups import find_dataset
from api.openapi import BINARY, form_body
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.responses import STORAGE_LIMIT
from api.schemas import DatasetPublic, DatasetsPublic
from api.upload_parser import UploadParser, dataset_name, upload_too_large
from swav_service import quota
from swav_service.dispatch import enqueue_ingest
from swav_service.models import (
    ACTIVE_EMBEDDING_JOB_STATUSES,
    ACTIVE_JOB_STATUSES,
    DELETED_DATASET,
    Dataset,
    EmbeddingJob,
    Job,
    new_id,
    utcnow,
)
from swav_service.quota import RESERVATION_RENEW_S, StorageLimitExceeded
from swav_service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# Room for the multipart framing around the archive: boundaries, part headers (python-
# multipart caps each at 4 KiB) and the short `name` field.
MULTIPART_OVERHEAD = 16 * 1024
FLUSH_BYTES = 1 << 20  # hand the parser 1 MiB at a time, off the event loop
RESERVE_STEP = 64 << 20  # a streamed upload without a length reserves this much at a time


UPLOAD_BODY = form_body(
    {
        "file": BINARY | {"description": "A .zip, .tar, .tar.gz or .tgz of image folders."},
        "name": {
            "type": "string",
            "maxLength": 200,
            "description": "Default: the file name without its extension.",
        },
    },
    ["file"],
)


@router.post(
    "",
    status_code=202,
    response_model=DatasetPublic,
    openapi_extra=UPLOAD_BODY,
    responses={
        **STORAGE_LIMIT,
        413: {"description": "Larger than SWAV_MAX_UPLOAD_BYTES (`payload_too_large`)."},
        415: {"description": "Not multipart, or not a zip/tar archive."},
        503: {"description": "The broker did not take the validation task."},
    },
)
async def upload_dataset(
    request: Request, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> DatasetPublic:
    """Upload an archive of images (one folder per class, or flat). Validation is async:
    poll `GET /v1/datasets/{id}` until `status` is `ready` or `failed`."""
    mime, options = parse_options_header(request.headers.get("content-type", ""))
    if mime != b"multipart/form-data":
        raise ApiError(
            415,
            "unsupported_media_type",
            "send the archive as multipart/form-data with a `file` part",
        )
    boundary = options.get(b"boundary")
    if not boundary:
        raise ApiError(400, "invalid_multipart", "the Content-Type header has no boundary")
    cap = settings.max_upload_bytes
    too_large: Callable[[], ApiError] = partial(upload_too_large, cap)
    left = await run_in_threadpool(_storage_left, session, settings, tenant)
    if left is not None and left < cap:  # the tenant's stored-bytes limit binds first: 403
        limit = settings.tenant_max_stored_bytes
        cap, too_large = left, partial(storage_error, limit - left, limit, left)
    body_cap = cap + MULTIPART_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_cap:
        raise too_large()
    # Held from here until the dataset row counts the archive: a concurrent upload of the
    # tenant sees these bytes as taken. Without a Content-Length it grows as bytes arrive.
    declared = min(int(length), cap) if length.isdigit() else 0
    hold = UploadHold(session, settings, tenant, cap)
    await run_in_threadpool(hold.grow, declared)

    dataset_id = new_id("ds")
    folder = settings.dataset_dir(dataset_id)
    parser = UploadParser(boundary, folder, cap, too_large)

    async def feed(data: bytes) -> None:
        """Reserve, then write: the bytes on disk never pass what is held."""
        await run_in_threadpool(hold.grow, parser.file_bytes + len(data), RESERVE_STEP)
        await run_in_threadpool(parser.write, data)

    try:
        received, pending = 0, bytearray()
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_cap:
                    raise too_large()
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    await feed(bytes(pending))
                    pending.clear()
        except ClientDisconnect as exc:  # nobody will read the answer; just clean up
            raise ApiError(400, "client_disconnected", "the upload was interrupted") from exc
        if pending:
            await feed(bytes(pending))
        parser.finish()
        if parser.filename is None:
            raise ApiError(
                422, "invalid_request", "file: a `file` part with the archive is required", "file"
            )
        if parser.file_bytes == 0:
            raise ApiError(422, "empty_archive", "file: the uploaded archive is empty", "file")
        name = dataset_name(parser)
    except BaseException:
        parser.close()
        shutil.rmtree(folder, ignore_errors=True)  # a partial upload is never kept
        await run_in_threadpool(hold.drop)
        raise

    def create() -> Dataset:
        """The dataset row takes over the reservation's bytes in one transaction."""
        row = Dataset(
            id=dataset_id,
            tenant=tenant,
            name=name,
            status="validating",
            archive_bytes=parser.file_bytes,
        )
        session.add(row)
        quota.release(session, hold.reservation_id)
        session.commit()
        return row

    try:
        row = await run_in_threadpool(create)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        await run_in_threadpool(hold.drop)
        raise
    try:
        await run_in_threadpool(enqueue_ingest, dataset_id)
    except Exception as exc:
        await run_in_threadpool(_broker_failed, session, row, folder)
        raise ApiError(
            503,
            "broker_unavailable",
            "the task broker is unreachable, so the archive cannot be validated; "
            "upload it again later",
        ) from exc
    return DatasetPublic.from_row(row)


def _storage_left(session: Session, settings: Settings, tenant: str) -> int | None:
    """`storage_left`, then the connection goes back to the pool while the body streams."""
    try:
        return storage_left(session, settings, tenant)
    finally:
        session.rollback()


class UploadHold:
    """An upload's reservation of stored bytes (swav_service/quota.py): grown before the
    bytes it covers are written, renewed while the body streams, dropped at the end."""

    def __init__(self, session: Session, settings: Settings, tenant: str, cap: int) -> None:
        self.session, self.settings, self.tenant, self.cap = session, settings, tenant, cap
        self.reservation_id: str | None = None
        self.held = 0
        self.renewed_at: float | None = None

    def grow(self, needed: int, step: int = 0) -> None:
        """Hold at least `needed` bytes (`step` more at a time, at most the cap); 403 if
        they do not fit. The first call checks the limit even for 0 bytes."""
        due = self.renewed_at is None or time.monotonic() - self.renewed_at >= RESERVATION_RENEW_S
        if needed <= self.held and not due:
            return
        target = min(self.cap, max(needed, self.held + step)) if needed > self.held else self.held
        try:
            self.reservation_id = quota.reserve(
                self.session, self.settings, self.tenant, target, self.reservation_id
            )
        except StorageLimitExceeded as error:
            raise storage_refused(error) from error
        self.held, self.renewed_at = target, time.monotonic()

    def drop(self) -> None:
        if self.reservation_id is not None:
            try:
                quota.release(self.session, self.reservation_id)
                self.session.commit()
            finally:
                self.session.rollback()


def _broker_failed(session: Session, row: Dataset, folder: Path) -> None:
    row.status = "failed"
    row.error_code = "broker_unavailable"
    row.error_message = "the task broker was unreachable when the archive was uploaded"
    row.updated_at = utcnow()
    session.commit()
    shutil.rmtree(folder, ignore_errors=True)


@router.get("", response_model=DatasetsPublic)
def list_datasets(
    session: SessionDep,
    tenant: TenantDep,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> DatasetsPublic:
    """The tenant's datasets, newest first."""
    statement = select(Dataset).where(Dataset.tenant == tenant, Dataset.status != DELETED_DATASET)
    rows, next_cursor = paginate(session, statement, Dataset, limit, cursor)
    return DatasetsPublic(data=[DatasetPublic.from_row(r) for r in rows], next_cursor=next_cursor)


@router.get("/{dataset_id}", response_model=DatasetPublic)
def get_dataset(dataset_id: str, session: SessionDep, tenant: TenantDep) -> DatasetPublic:
    return DatasetPublic.from_row(find_dataset(session, tenant, dataset_id))


@router.delete(
    "/{dataset_id}",
    status_code=204,
    responses={409: {"description": "Validating, or used by an active job or embedding job "
                     "(`dataset_in_use`)."}},
)
def delete_dataset(
    dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Delete the dataset's files, and its row unless finished jobs refer to it. With an
    artifact store, the workers remove its copies there in the background
    (worker/store_sweep.py), so a store outage never fails the delete."""
    # The row lock serialises this with job creation, which locks the dataset too.
    row = find_dataset(session, tenant, dataset_id, lock=True)
    if row.status == "validating":
        raise ApiError(
            409,
            "dataset_in_use",
            "the dataset is still being validated; delete it once it is ready or failed",
            "dataset_id",
        )
    active = session.execute(
        select(Job.id, Job.status)
        .where(Job.dataset_id == dataset_id, Job.status.in_(ACTIVE_JOB_STATUSES))
        .union_all(
            select(EmbeddingJob.id, EmbeddingJob.status).where(
                EmbeddingJob.dataset_id == dataset_id,
                EmbeddingJob.status.in_(ACTIVE_EMBEDDING_JOB_STATUSES),
            )
        )
        .limit(1)
    ).first()
    if active is not None:
        raise ApiError(
            409,
            "dataset_in_use",
            f"{active.id} is {active.status} on this dataset; cancel it or wait for it "
            "to finish, then delete",
            "dataset_id",
        )
    referenced = session.execute(
        select(Job.id).where(Job.dataset_id == dataset_id)
        .union_all(select(EmbeddingJob.id).where(EmbeddingJob.dataset_id == dataset_id))
        .limit(1)
    ).first()
    if referenced is None:
        session.delete(row)
    else:  # finished jobs and embedding jobs keep their dataset's row, without its files
        row.status = DELETED_DATASET
        row.updated_at = utcnow()
    session.commit()
    shutil.rmtree(settings.dataset_dir(dataset_id), ignore_errors=True)
    return Response(status_code=204)
