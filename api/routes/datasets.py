"""Datasets: streamed archive upload, listing, deletion.

An upload is parsed as it arrives (python-multipart's streaming parser on
`request.stream()`) and the `file` part goes straight to
`<artifacts>/datasets/<id>/upload.<ext>`, counting bytes against
`settings.max_upload_bytes`: the body is never held in memory or spooled twice, and an
oversized one is refused at its Content-Length or as soon as the count passes the cap.
The tenant's stored-bytes limit holds under concurrency: at admission the upload reserves
its Content-Length (or, without one, reserves ahead of what it streams) under the tenant's
lock (api/upload_hold.py), and its dataset row takes the reservation over.
The worker's `ingest_dataset` then extracts and validates it (status `validating` ->
`ready` or `failed`).

Deleting a dataset removes its files. Its row is removed too, unless finished jobs still
refer to it (their `dataset_id` must stay valid): then the row is kept with status
`deleted`, hidden from every route, so those jobs keep existing but cannot be resumed.
"""

from __future__ import annotations

import shutil
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
from api.lookups import find_dataset
from api.openapi import BINARY, form_body
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.responses import STORAGE_LIMIT
from api.schemas.artifacts import DatasetPublic, DatasetsPublic
from api.upload_hold import RESERVE_STEP, UploadHold, declared_bytes, upload_cap
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

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

# Room for the multipart framing around the archive: boundaries, part headers (python-
# multipart caps each at 4 KiB) and the short `name` field.
MULTIPART_OVERHEAD = 16 * 1024
FLUSH_BYTES = 1 << 20  # hand the parser 1 MiB at a time, off the event loop


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
    allowed = await run_in_threadpool(
        upload_cap, session, settings, tenant, settings.max_upload_bytes,
        partial(upload_too_large, settings.max_upload_bytes),
    )
    cap, too_large = allowed.nbytes, allowed.too_large
    body_cap = cap + MULTIPART_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_cap:
        raise too_large()
    # Held from here until the dataset row counts the archive.
    hold = UploadHold(session, settings, tenant, cap)
    await run_in_threadpool(hold.grow, declared_bytes(length, cap))

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
