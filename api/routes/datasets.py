"""Datasets: streamed archive upload, listing, deletion.

An upload is parsed as it arrives (python-multipart's streaming parser on
`request.stream()`) and the `file` part goes straight to
`<artifacts>/datasets/<id>/upload.<ext>`, counting bytes against
`settings.max_upload_bytes`: the body is never held in memory or spooled twice, and an
oversized one is refused at its Content-Length or as soon as the count passes the cap.
The worker's `ingest_dataset` then extracts and validates it (status `validating` ->
`ready` or `failed`).

Deleting a dataset removes its files. Its row is removed too, unless finished jobs still
refer to it (their `dataset_id` must stay valid): then the row is kept with status
`deleted`, hidden from every route, so those jobs keep existing but cannot be resumed.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import IO, Any

from fastapi import APIRouter, Request, Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.limits import human_bytes, storage_error, storage_left
from api.lookups import find_dataset
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.schemas import DatasetPublic, DatasetsPublic
from swav_service.dispatch import enqueue_ingest
from swav_service.models import (
    ACTIVE_JOB_STATUSES,
    DELETED_DATASET,
    Dataset,
    Job,
    new_id,
    utcnow,
)
from swav_service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])

ARCHIVE_EXTENSIONS = (".tar.gz", ".tgz", ".zip", ".tar")  # longest suffix first
# Room for the multipart framing around the archive: boundaries, part headers (python-
# multipart caps each at 4 KiB) and the short `name` field.
MULTIPART_OVERHEAD = 16 * 1024
MAX_FIELD_BYTES = 1024
FORM_FIELDS = ("file", "name")
FLUSH_BYTES = 1 << 20  # hand the parser 1 MiB at a time, off the event loop


def _too_large(cap: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the upload exceeds the {human_bytes(cap)} limit ({cap} bytes, SWAV_MAX_UPLOAD_BYTES); "
        "upload a smaller archive",
        "file",
    )


def archive_extension(filename: str) -> str | None:
    lowered = filename.lower()
    return next((ext for ext in ARCHIVE_EXTENSIONS if lowered.endswith(ext)), None)


class UploadParser:
    """Streams a multipart/form-data body: the `file` part to disk, small fields to memory.

    Feed it with `write(chunk)`, then call `finish()`. Raises ApiError as soon as the
    body breaks a rule (archive type, size cap, oversized or unknown field), so the caller
    can stop reading. `too_large` is the error for a file over `max_file_bytes` (default:
    413 for the upload cap).
    """

    def __init__(
        self,
        boundary: bytes,
        folder: Path,
        max_file_bytes: int,
        too_large: Callable[[], ApiError] | None = None,
    ) -> None:
        self.folder = folder
        self.max_file_bytes = max_file_bytes
        self.too_large = too_large or partial(_too_large, max_file_bytes)
        self.fields: dict[str, bytes] = {}
        self.filename: str | None = None
        self.extension: str | None = None
        self.file_bytes = 0
        self.path: Path | None = None
        self._ended = False
        self._headers: dict[str, bytes] = {}
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._part_name: str | None = None
        self._part_value = bytearray()
        self._out: IO[bytes] | None = None
        callbacks: Any = {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field_data,
            "on_header_value": self._header_value_data,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }
        self._parser = MultipartParser(boundary, callbacks)

    def write(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except MultipartParseError as exc:
            raise ApiError(
                400, "invalid_multipart", f"the multipart body is malformed: {exc}"
            ) from exc

    def finish(self) -> None:
        self._parser.finalize()
        if not self._ended:
            raise ApiError(
                400, "invalid_multipart", "the multipart body ended before its closing boundary"
            )

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None

    # python-multipart callbacks ---------------------------------------------------------

    def _part_begin(self) -> None:
        self._headers = {}
        self._part_name = None
        self._part_value = bytearray()

    def _header_field_data(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._header_field.decode("latin-1").lower()] = bytes(self._header_value)
        self._header_field = bytearray()
        self._header_value = bytearray()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._part_name = name
        if name not in FORM_FIELDS:
            field = name[:100]
            raise ApiError(
                422,
                "invalid_request",
                f"{field}: unknown field; send only `file` and optionally `name`",
                field or None,
            )
        if name != "file":
            return
        if self.filename is not None:
            raise ApiError(422, "invalid_request", "file: send exactly one `file` part", "file")
        self.filename = options.get(b"filename", b"").decode("utf-8", "replace")
        self.extension = archive_extension(self.filename)
        if self.extension is None:
            raise ApiError(
                415,
                "unsupported_archive",
                f"file: {Path(self.filename).name[:100]!r} is not a supported archive; "
                f"upload one of {', '.join(ARCHIVE_EXTENSIONS)}",
                "file",
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / f"upload{self.extension}"
        self._out = open(self.path, "wb")  # noqa: SIM115 (closed in _part_end or close)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part_name == "file" and self._out is not None:
            self.file_bytes += end - start
            if self.file_bytes > self.max_file_bytes:
                raise self.too_large()
            self._out.write(data[start:end])
            return
        self._part_value += data[start:end]
        if len(self._part_value) > MAX_FIELD_BYTES:
            raise ApiError(
                422,
                "invalid_request",
                f"{self._part_name}: form fields are limited to {MAX_FIELD_BYTES} bytes",
                self._part_name or None,
            )

    def _part_end(self) -> None:
        if self._part_name == "file":
            self.close()
        elif self._part_name:
            self.fields[self._part_name] = bytes(self._part_value)

    def _end(self) -> None:
        self._ended = True


def _dataset_name(parser: UploadParser) -> str:
    if "name" in parser.fields:
        name = parser.fields["name"].decode("utf-8", "replace").strip()
    else:
        filename = Path((parser.filename or "").replace("\\", "/")).name
        name = filename[: len(filename) - len(parser.extension or "")].strip()
    if not name:
        name = "dataset"
    if len(name) > 200:
        raise ApiError(422, "invalid_request", "name: at most 200 characters", "name")
    return name


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A .zip, .tar, .tar.gz or .tgz of image folders.",
                        },
                        "name": {
                            "type": "string",
                            "maxLength": 200,
                            "description": "Default: the file name without its extension.",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=DatasetPublic,
    openapi_extra=UPLOAD_BODY,
    responses={
        403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."},
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
    too_large: Callable[[], ApiError] = partial(_too_large, cap)
    left = await run_in_threadpool(_storage_left, session, settings, tenant)
    if left is not None and left < cap:  # the tenant's stored-bytes limit binds first: 403
        limit = settings.tenant_max_stored_bytes
        cap, too_large = left, partial(storage_error, limit - left, limit, left)
    body_cap = cap + MULTIPART_OVERHEAD
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > body_cap:
        raise too_large()

    dataset_id = new_id("ds")
    folder = settings.dataset_dir(dataset_id)
    parser = UploadParser(boundary, folder, cap, too_large)
    try:
        received, pending = 0, bytearray()
        try:
            async for chunk in request.stream():
                received += len(chunk)
                if received > body_cap:
                    raise too_large()
                pending += chunk
                if len(pending) >= FLUSH_BYTES:
                    await run_in_threadpool(parser.write, bytes(pending))
                    pending.clear()
        except ClientDisconnect as exc:  # nobody will read the answer; just clean up
            raise ApiError(400, "client_disconnected", "the upload was interrupted") from exc
        if pending:
            await run_in_threadpool(parser.write, bytes(pending))
        parser.finish()
        if parser.filename is None:
            raise ApiError(
                422, "invalid_request", "file: a `file` part with the archive is required", "file"
            )
        if parser.file_bytes == 0:
            raise ApiError(422, "empty_archive", "file: the uploaded archive is empty", "file")
        name = _dataset_name(parser)
    except BaseException:
        parser.close()
        shutil.rmtree(folder, ignore_errors=True)  # a partial upload is never kept
        raise

    def create() -> Dataset:
        row = Dataset(
            id=dataset_id,
            tenant=tenant,
            name=name,
            status="validating",
            archive_bytes=parser.file_bytes,
        )
        session.add(row)
        session.commit()
        return row

    try:
        row = await run_in_threadpool(create)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
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
    responses={409: {"description": "Validating, or used by an active job (`dataset_in_use`)."}},
)
def delete_dataset(
    dataset_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Delete the dataset's files, and its row unless finished jobs refer to it."""
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
        .limit(1)
    ).first()
    if active is not None:
        raise ApiError(
            409,
            "dataset_in_use",
            f"job {active.id} is {active.status} on this dataset; cancel it or wait for it "
            "to finish, then delete",
            "dataset_id",
        )
    referenced = session.scalar(select(Job.id).where(Job.dataset_id == dataset_id).limit(1))
    if referenced is None:
        session.delete(row)
    else:
        row.status = DELETED_DATASET
        row.updated_at = utcnow()
    session.commit()
    shutil.rmtree(settings.dataset_dir(dataset_id), ignore_errors=True)
    return Response(status_code=204)
