"""Typed results: the API's public schemas as the client reads them.

These mirror `api/schemas.py` (`DatasetPublic`, `JobPublic`, ...) rather than importing it,
so the client needs neither FastAPI nor SQLAlchemy, and fields a newer server adds are
ignored rather than refused. A test checks every field here against a live server's
OpenAPI document.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

TERMINAL_JOB_STATUSES = frozenset({"succeeded", "failed", "cancelled"})


class Resource(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ErrorInfo(Resource):
    code: str
    message: str | None = None


class Dataset(Resource):
    id: str
    name: str
    status: str  # validating, ready or failed
    archive_bytes: int
    num_images: int | None = None
    num_skipped: int | None = None
    skipped: list[Any] | None = None
    classes: list[Any] | None = None
    fingerprint: str | None = None
    stats: dict[str, Any] | None = None
    error: ErrorInfo | None = None
    created_at: datetime
    updated_at: datetime


class Progress(Resource):
    step: int
    total_steps: int | None = None
    epoch: int
    epochs: int


class Job(Resource):
    id: str
    name: str | None = None
    dataset_id: str
    preset: str | None = None
    status: str  # queued, running, cancelling, succeeded, failed, cancelled
    progress: Progress
    metrics: dict[str, Any] | None = None
    eta_s: float | None = None
    attempt: int
    error: ErrorInfo | None = None
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime
    config: dict[str, Any]
    metadata: dict[str, Any] | None = None
    compute_seconds: float
    resources: dict[str, int] | None = None  # {"gpus": N, "nodes": M}
    keep_best_by: str | None = None
    max_attempts: int | None = None
    max_runtime_s: float | None = None
    # {"checkpoint_id": ..., "weights_id": ...}: what the run started from (one is set).
    start_from: dict[str, str | None] | None = None

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_JOB_STATUSES


class CostEstimate(Resource):
    device: str
    machine: str
    machine_gflops: float
    workers: int
    gflops_per_image: float
    seconds_per_epoch: float
    total_seconds: float
    peak_memory_gib: float
    fits_memory: bool


class JobPlan(Resource):
    """The answer of a dry run: the config the job would get, why, and what it would cost."""

    dry_run: bool
    preset: str
    config: dict[str, Any]
    reasons: dict[str, str]
    dataset_stats: dict[str, Any] | None = None
    estimates: list[CostEstimate]


class Event(Resource):
    seq: int
    type: str  # state, started, metrics, checkpoint, warning, finished, ...
    data: dict[str, Any]
    created_at: datetime


class Checkpoint(Resource):
    id: str
    job_id: str
    step: int
    epoch: int
    final: bool
    available: bool
    size_bytes: int
    sha256: str
    metrics: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    export_formats: list[str] = Field(default_factory=list)  # the `--format`s it downloads in
    created_at: datetime


class Backbones(Resource):
    """Names `config.backbone` accepts: ours, then `timm/...`, then `torchvision/...`."""

    data: list[str]
    versions: dict[str, str]


class Weights(Resource):
    id: str
    name: str
    size_bytes: int
    sha256: str
    num_tensors: int
    backbone: str | None = None
    created_at: datetime


T = TypeVar("T", bound=Resource)


class Page(BaseModel, Generic[T]):
    """One page of a listing; pass `next_cursor` back as `cursor` (null on the last)."""

    data: list[T]
    next_cursor: str | None = None


@dataclass(frozen=True)
class Embeddings:
    """`vectors[i]` is the embedding of the i-th image given, float32 (N, dim)."""

    model: str  # the checkpoint id that computed them
    vectors: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])
