"""The explorer's API: a job's dataset as a 2-D map, and a dropped image's nearest neighbours.

Both read an *index* of the job's dataset for one checkpoint (`checkpoint_id`, default the
job's latest available one, final preferred): the files of a batch embedding job (backbone
features, L2-normalised; `POST /v1/jobs/{id}/embeddings`), computed by a short-queue
worker, never in the API. The first request for a checkpoint without one queues that
embedding job and answers 202 `indexing` (`GET .../map`) or 409 `index_not_ready`
(`POST .../neighbours`); later requests reuse it, and each API process keeps the few most
recent indexes in memory (`api.dashboard.index`), so a request costs one matrix-vector
product, not a pass over the dataset. Finding or queueing the index is
`api.dashboard.index_location`; thumbnails are drawn by `api.dashboard.thumbnails`.

A dropped image is embedded by the `POST /v1/embeddings` service (its model cache,
micro-batching, decoding limits, and the worker's preprocessing), so a dataset image
finds itself with cosine 1. Thumbnails (`GET /v1/jobs/{id}/images/{path}`) are re-encoded
PNGs of images inside the dataset's images folder only. Every route is scoped to the
key's tenant: another tenant's job is 404.
"""

from __future__ import annotations

import base64
import json
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from api.body_limits import single_image_part
from api.dashboard.index_location import INDEX_LAYER, index_cache, locate_index, read_index
from api.dashboard.thumbnails import (
    THUMBNAIL_SIDE,
    dataset_image_path,
    render_thumbnail,
    thumbnail_url,
)
from api.deps import SessionDep, SettingsDep, TenantDep
from api.embedding_service import get_service
from api.errors import ApiError, not_found
from api.limits import limit_rate, limit_thumbnail_rate
from api.lookups import find_dataset, find_job
from api.model_resolution import ResolvedModel
from api.openapi import BINARY, form_body
from api.responses import BROKER_UNAVAILABLE, RATE_LIMITED, STORAGE_LIMIT, Responses

router = APIRouter(tags=["explorer"])

MAP_POINTS = 2000
MAX_MAP_POINTS = 20_000
RETRY_AFTER_S = 2
INDEX_GONE: Responses = {
    410: {"description": "The checkpoint was pruned, or the index files removed."}
}

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


NEIGHBOURS_BODY = form_body({"file": BINARY}, ["file"])


# --------------------------------------------------------------------------- routes


@router.get(
    "/v1/jobs/{job_id}/map",
    response_model=DatasetMap,
    responses={
        202: {"model": DatasetMap, "description": "The index is being computed (`indexing`)."},
        **STORAGE_LIMIT,
        409: {"description": "No checkpoint yet (`model_not_ready`), the dataset is not ready "
              "(`dataset_not_ready`), or its indexing failed (`index_failed`)."},
        **INDEX_GONE,
        **BROKER_UNAVAILABLE,
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
    located = await run_in_threadpool(locate_index, settings, tenant, job_id, checkpoint_id)
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


@router.post(
    "/v1/jobs/{job_id}/neighbours",
    response_model=NeighboursPublic,
    openapi_extra=NEIGHBOURS_BODY,
    responses={
        400: {"description": "The image does not decode or is not an allowed format."},
        **STORAGE_LIMIT,
        409: {"description": "The index is being computed (`index_not_ready`, see "
              "Retry-After), no checkpoint yet (`model_not_ready`), the dataset is not ready, "
              "or its indexing failed (`index_failed`)."},
        **INDEX_GONE,
        413: {"description": "The image is too large (bytes or pixels)."},
        415: {"description": "Not multipart/form-data."},
        **RATE_LIMITED,
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
    located = await run_in_threadpool(locate_index, settings, tenant, job_id, checkpoint_id)
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
    data = await single_image_part(request, settings)
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


@router.get(
    "/v1/jobs/{job_id}/images/{path:path}",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "A PNG thumbnail."},
               **RATE_LIMITED},
    dependencies=[Depends(limit_thumbnail_rate)],
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

