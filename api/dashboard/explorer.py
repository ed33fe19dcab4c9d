"""The explorer's API: a job's dataset as a 2-D map, and a dropped image's nearest neighbours.

Both read an *index* of the job's dataset for one checkpoint (`checkpoint_id`, default the
job's latest available one, final preferred): the files of a batch embedding job (backbone
features, L2-normalised; `POST /v1/jobs/{id}/embeddings`), computed by a short-queue
worker, never in the API. The first request for a checkpoint without one queues that
embedding job and answers 202 `indexing` (`GET .../map`) or 409 `index_not_ready`
(`POST .../neighbours`); later requests reuse it, and each API process keeps the few most
recent indexes in memory (`api.dashboard.index`), so a request costs one matrix-vector
product, not a pass over the dataset.

A dropped image is embedded by the `POST /v1/embeddings` service (its model cache,
micro-batching, decoding limits, and the worker's preprocessing), so a dataset image
finds itself with cosine 1. Thumbnails (`GET /v1/jobs/{id}/images/{path}`) are re-encoded
PNGs of images inside the dataset's images folder only. Every route is scoped to the
key's tenant: another tenant's job is 404.
"""

from __future__ import annotations

import base64
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageOps
from pydantic import BaseModel, Field
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from api.batch_embedding import queue_embedding_job
from api.body_limits import BODY_OVERHEAD, capped_stream, read_capped
from api.dashboard.index import ExplorerIndex, IndexCache, load_index
from api.deps import SessionDep, SettingsDep, TenantDep
from api.embedding_service import Layer, ResolvedModel, get_service
from api.errors import ApiError, not_found
from api.limits import limit_rate
from api.lookups import find_dataset, find_job, pick_checkpoint, ready_dataset, stored_path
from api.schemas import EmbeddingJobCreate
from swav_core.images import ALLOWED_FORMATS
from swav_service.db import get_sessionmaker
from swav_service.layout import EMBEDDINGS_FILE, INDEX_FILE, dataset_images_dir
from swav_service.models import EmbeddingJob
from swav_service.settings import Settings

router = APIRouter(tags=["explorer"])

INDEX_LAYER: Layer = "backbone"  # what kNN evaluation uses; unit rows make cosine a dot product
MAP_POINTS = 2000
MAX_MAP_POINTS = 20_000
THUMBNAIL_SIDE = 160
RETRY_AFTER_S = 2

CheckpointQuery = Annotated[
    str | None,
    Query(max_length=40, description="A checkpoint of the job; default: its latest one."),
]


class MapPoint(BaseModel):
    path: str = Field(description="The image, relative to the dataset root.")
    label: str | None = Field(description="Its class folder; null when the dataset has none.")
    x: float
    y: float


class DatasetMap(BaseModel):
    status: Literal["ready", "indexing"] = Field(
        description="indexing: the embedding job is queued or running; retry in a moment."
    )
    job_id: str
    checkpoint_id: str
    embedding_job_id: str
    num_images: int | None = Field(description="Rows of the index (null while indexing).")
    explained_variance: list[float] = Field(
        description="The fraction of the embeddings' variance along x and along y."
    )
    points: list[MapPoint] = Field(
        description="The first two principal components of every image's embedding; "
        "evenly sampled down to `limit` points."
    )


class Neighbour(MapPoint):
    score: float = Field(description="Cosine similarity with the dropped image, in [-1, 1].")
    thumbnail_url: str


class NeighboursPublic(BaseModel):
    job_id: str
    checkpoint_id: str
    embedding_job_id: str
    query: list[float] = Field(description="The dropped image's (x, y) on the map.")
    data: list[Neighbour] = Field(description="Most similar first.")


NEIGHBOURS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            }
        },
    }
}


# --------------------------------------------------------------------------- the index


def index_cache(request: Request) -> IndexCache:
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


def locate_index(
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


def _locate(settings: Settings, tenant: str, job_id: str, checkpoint_id: str | None) -> Located:
    with get_sessionmaker()() as session:  # short: not held while embedding
        return locate_index(session, settings, tenant, job_id, checkpoint_id)


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


def thumbnail_url(job_id: str, path: str) -> str:
    return f"/v1/jobs/{job_id}/images/{quote(path, safe='/')}"


# --------------------------------------------------------------------------- routes


@router.get(
    "/v1/jobs/{job_id}/map",
    response_model=DatasetMap,
    responses={
        202: {"model": DatasetMap, "description": "The index is being computed (`indexing`)."},
        403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."},
        409: {"description": "No checkpoint yet (`model_not_ready`), the dataset is not ready "
              "(`dataset_not_ready`), or its indexing failed (`index_failed`)."},
        410: {"description": "The checkpoint was pruned, or the index files removed."},
        503: {"description": "The task broker is unreachable (`broker_unavailable`)."},
    },
)
async def dataset_map(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    checkpoint_id: CheckpointQuery = None,
    limit: Annotated[
        int, Query(ge=1, le=MAX_MAP_POINTS, description="At most this many points.")
    ] = MAP_POINTS,
) -> Any:
    """Every image of the job's dataset on the 2-D PCA of its embeddings (the backbone
    features of the checkpoint). The first call for a checkpoint queues the dataset's
    embedding job and answers 202 with no points; poll until `status` is `ready`."""
    located = await run_in_threadpool(_locate, settings, tenant, job_id, checkpoint_id)
    if located.folder is None:
        body = DatasetMap(
            status="indexing", job_id=located.job_id, checkpoint_id=located.checkpoint_id,
            embedding_job_id=located.embedding_job_id, num_images=None,
            explained_variance=[], points=[],
        )
        return JSONResponse(
            body.model_dump(mode="json"), status_code=202,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    index = await run_in_threadpool(read_index, index_cache(request), located)
    rows = np.linspace(0, len(index.paths) - 1, min(limit, len(index.paths))).round()
    points = [
        MapPoint(path=index.paths[i], label=index.labels[i],
                 x=float(index.coords[i, 0]), y=float(index.coords[i, 1]))
        for i in dict.fromkeys(int(r) for r in rows)
    ]
    return DatasetMap(
        status="ready", job_id=located.job_id, checkpoint_id=located.checkpoint_id,
        embedding_job_id=located.embedding_job_id, num_images=len(index.paths),
        explained_variance=list(index.projection.explained), points=points,
    )


async def read_image_part(request: Request, settings: Settings) -> bytes:
    """The bytes of the multipart body's one `file` part (413 over the image byte cap)."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data with the image as `file`"
        )
    limit = settings.max_image_bytes
    parser = MultiPartParser(
        request.headers, capped_stream(request, limit + BODY_OVERHEAD), max_files=1, max_fields=0
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed: {exc.message}"
        ) from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: one image file part is required", "file")
        return await read_capped(upload, limit, "file")
    finally:
        await form.close()


@router.post(
    "/v1/jobs/{job_id}/neighbours",
    response_model=NeighboursPublic,
    openapi_extra=NEIGHBOURS_BODY,
    responses={
        400: {"description": "The image does not decode or is not an allowed format."},
        403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."},
        409: {"description": "The index is being computed (`index_not_ready`, see "
              "Retry-After), no checkpoint yet (`model_not_ready`), the dataset is not ready, "
              "or its indexing failed (`index_failed`)."},
        410: {"description": "The checkpoint was pruned, or the index files removed."},
        413: {"description": "The image is too large (bytes or pixels)."},
        415: {"description": "Not multipart/form-data."},
        429: {"description": "Over the tenant's request rate (`rate_limited`); see Retry-After."},
        503: {"description": "The model's queue is full, or the broker is unreachable."},
    },
    dependencies=[Depends(limit_rate)],
)
async def find_neighbours(
    job_id: str,
    request: Request,
    settings: SettingsDep,
    tenant: TenantDep,
    checkpoint_id: CheckpointQuery = None,
    k: Annotated[int, Query(ge=1, le=100, description="How many neighbours.")] = 12,
) -> NeighboursPublic:
    """The k images of the job's dataset most similar to the uploaded one (`file`), by
    cosine similarity of the checkpoint's backbone features, with thumbnail URLs."""
    located = await run_in_threadpool(_locate, settings, tenant, job_id, checkpoint_id)
    if located.folder is None:
        raise ApiError(
            409,
            "index_not_ready",
            f"the dataset is being indexed (embedding job {located.embedding_job_id}); "
            f"retry in {RETRY_AFTER_S} s, or poll GET /v1/jobs/{job_id}/map",
            "checkpoint_id",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    if located.model_path is None:
        raise ApiError(
            410, "checkpoint_gone",
            f"checkpoint {located.checkpoint_id} is no longer on disk", "checkpoint_id",
        )
    data = await read_image_part(request, settings)
    index = await run_in_threadpool(read_index, index_cache(request), located)
    body = await get_service(request).embed(
        ResolvedModel(located.checkpoint_id, located.model_path),
        [data], "file", INDEX_LAYER, True, "base64",
    )
    encoded = json.loads(body)["data"][0]["embedding"]
    query = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    if query.shape[0] != index.vectors.shape[1]:
        raise ApiError(
            410, "index_gone",
            f"embedding job {located.embedding_job_id} has {index.vectors.shape[1]}-dimensional "
            f"rows but checkpoint {located.checkpoint_id} gives {query.shape[0]}; index again "
            "with POST /v1/jobs/{job_id}/embeddings",
            "checkpoint_id",
        )
    position = index.projection(query[None])[0]
    return NeighboursPublic(
        job_id=located.job_id,
        checkpoint_id=located.checkpoint_id,
        embedding_job_id=located.embedding_job_id,
        query=[float(position[0]), float(position[1])],
        data=[
            Neighbour(
                path=index.paths[row], label=index.labels[row], score=score,
                thumbnail_url=thumbnail_url(located.job_id, index.paths[row]),
                x=float(index.coords[row, 0]), y=float(index.coords[row, 1]),
            )
            for row, score in index.nearest(query, k)
        ],
    )


def dataset_image_path(settings: Settings, dataset_id: str, path: str) -> Path | None:
    """`path` under the dataset's images folder, or None when it is not a file in it.

    Resolved first (`..`, absolute paths and links all end elsewhere), then required to be
    inside the folder: nothing outside it is ever opened.
    """
    root = dataset_images_dir(settings, dataset_id).resolve()
    try:
        target = (root / path).resolve()
    except (OSError, ValueError):  # a NUL byte, a loop of links
        return None
    if target == root or not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def render_thumbnail(file: Path, side: int, max_pixels: int) -> bytes | None:
    """A PNG of the image, at most `side` px on its longer side; None unless the file is
    an allowed image within `max_pixels` (files skipped at ingestion stay in the folder).

    Read from the file, not into memory first: the header is checked before any pixel is
    decoded, and JPEGs are decoded at a reduced scale (`draft`).
    """
    try:
        with Image.open(file) as image:
            width, height = image.size
            if image.format not in ALLOWED_FORMATS or width * height > max_pixels:
                return None
            image.draft("RGB", (side, side))
            frame = ImageOps.exif_transpose(image)
            frame.thumbnail((side, side))
            if frame.mode not in ("RGB", "RGBA", "L", "LA"):
                frame = frame.convert("RGB")
            buffer = io.BytesIO()
            frame.save(buffer, format="PNG")
            return buffer.getvalue()
    # Truncated or malformed files fail with many exception types; all mean "not shown".
    except Exception:
        return None


@router.get(
    "/v1/jobs/{job_id}/images/{path:path}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "A PNG thumbnail."}},
)
def dataset_image(
    job_id: str,
    path: str,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    size: Annotated[
        int, Query(ge=16, le=512, description="The longer side in pixels, at most.")
    ] = THUMBNAIL_SIDE,
) -> Response:
    """A thumbnail of one image of the job's dataset (`path` as in the map or neighbours)."""
    job = find_job(session, tenant, job_id)
    dataset = find_dataset(session, tenant, job.dataset_id)
    file = dataset_image_path(settings, dataset.id, path)
    png = render_thumbnail(file, size, settings.max_image_pixels) if file else None
    if png is None:
        raise not_found(f"image of dataset {dataset.id}", "path", path[:200])
    return Response(
        png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"}
    )

