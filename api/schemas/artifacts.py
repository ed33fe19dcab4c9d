"""What a tenant stores and how it is shown: datasets, checkpoints, embedding jobs,
uploaded weights, and the usage counted against its stored-bytes limit."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import object_session

from api.schemas.common import ErrorInfo, Layer, PublicModel
from swav_core.export_formats import export_formats
from swav_service.models import (
    Checkpoint,
    Dataset,
    DatasetStatus,
    EmbeddingJob,
    EmbeddingJobStatus,
    Job,
    Weights,
)


class DatasetPublic(PublicModel):
    id: str
    name: str
    status: DatasetStatus
    archive_bytes: int
    num_images: int | None = None
    num_skipped: int | None = None
    skipped: list[Any] | None = Field(None, description="Files that were not images, why.")
    classes: list[Any] | None = None
    fingerprint: str | None = None
    stats: dict[str, Any] | None = Field(
        None,
        description="num_images, num_classes, median_short_side (px) and grayscale_fraction "
        "of the ready images: what `preset: auto` chooses from.",
    )
    error: ErrorInfo | None = None
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: Dataset) -> DatasetPublic:
        return cls.from_attributes(row, error=ErrorInfo.of(row))


class DatasetsPublic(BaseModel):
    data: list[DatasetPublic]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null last.")


class CheckpointPublic(PublicModel):
    id: str
    job_id: str
    step: int
    epoch: int
    final: bool
    available: bool = Field(description="False once pruned from disk (downloads answer 410).")
    size_bytes: int
    sha256: str
    metrics: dict[str, Any] | None
    quality: dict[str, Any] | None = Field(
        None,
        description="knn_top1, linear_top1 (in [0, 1]), n_train, n_val of the backbone on "
        "the job's labelled dataset; null until evaluated, or when the dataset has no classes.",
    )
    best: bool = Field(
        False, description="The job's best checkpoint by its keep_best_by metric (kept)."
    )
    evaluation_error: ErrorInfo | None = Field(
        None,
        description="Why the last quality report asked for could not be computed (e.g. "
        "`worker_lost`, `checkpoint_gone`); null once one is asked for again.",
    )
    export_formats: list[str] = Field(
        default_factory=list,
        description="The `format`s it downloads in (by its job's backbone): full, "
        "safetensors, onnx, and backbone (our own and torchvision backbones) or timm.",
    )
    created_at: datetime

    @classmethod
    def from_row(cls, row: Checkpoint) -> CheckpointPublic:
        session = object_session(row)
        job = session.get(Job, row.job_id) if session is not None else None  # cached after one
        backbone = str(job.config.get("backbone", "")) if job is not None else None
        formats = list(export_formats(backbone)) if backbone else []
        return cls.from_attributes(row, export_formats=formats)


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    next_cursor: str | None


class EmbeddingJobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str | None = Field(
        None, max_length=40, description="Default: the dataset the job trained on."
    )
    checkpoint_id: str | None = Field(
        None,
        max_length=40,
        description="A checkpoint of this job; default: its latest available one (final "
        "preferred, else the highest step).",
    )
    layer: Layer = Field(
        "backbone", description="backbone: pooled features; projection: the head's output z."
    )
    normalize: bool = Field(True, description="L2-normalise each row.")


class EmbeddingJobPublic(PublicModel):
    id: str
    job_id: str | None
    checkpoint_id: str
    dataset_id: str
    layer: str
    normalize: bool
    status: EmbeddingJobStatus
    num_rows: int | None = Field(None, description="Rows of the matrix once succeeded.")
    error: ErrorInfo | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: EmbeddingJob) -> EmbeddingJobPublic:
        return cls.from_attributes(row, error=ErrorInfo.of(row))


class UsagePublic(BaseModel):
    """What the tenant stores, as counted against SWAV_TENANT_MAX_STORED_BYTES."""

    stored_bytes: int = Field(description="The sum of the parts below.")
    limit_bytes: int | None = Field(description="The tenant's limit; null: none.")
    archives_bytes: int = Field(description="Uploaded dataset archives.")
    images_bytes: int = Field(description="Extracted dataset images.")
    checkpoints_bytes: int = Field(
        description="Checkpoints on disk, with their sidecars and safetensors exports."
    )
    embeddings_bytes: int = Field(description="Files of finished embedding jobs.")
    reserved_bytes: int = Field(description="Held by uploads in progress.")
    weights_bytes: int = Field(0, description="Uploaded weights files (POST /v1/weights).")


class WeightsPublic(PublicModel):
    """An uploaded weights file that jobs may start from (`start_from.weights_id`)."""

    id: str
    name: str
    size_bytes: int
    sha256: str
    num_tensors: int
    backbone: str | None = Field(description="The backbone its metadata names, if any.")
    created_at: datetime

    @classmethod
    def from_row(cls, row: Weights) -> WeightsPublic:
        return cls.from_attributes(row)


class WeightsListPublic(BaseModel):
    data: list[WeightsPublic]
    next_cursor: str | None
