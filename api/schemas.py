"""Request and response bodies: `XCreate` (input, unknown keys rejected), `XPublic`, `XsPublic`.

Responses are built from rows with `from_row`, so what the API shows is chosen here and
not by whatever columns a model happens to have (leases, tenants and paths stay inside).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swav_core.config import TrainConfig, TrainConfigOverrides
from swav_core.presets import PresetName
from swav_service.models import (
    Checkpoint,
    Dataset,
    DatasetStatus,
    EmbeddingJob,
    EmbeddingJobStatus,
    Job,
    JobEvent,
    JobStatus,
    as_utc,
)

if TYPE_CHECKING:  # built from TrainConfig's fields at import (swav_core/config.py)
    ConfigOverrides = BaseModel
else:
    ConfigOverrides = TrainConfigOverrides

QualityMetric = Literal["knn_top1", "linear_top1"]
Layer = Literal["backbone", "projection"]  # what an embedding is read from


class PublicModel(BaseModel):
    @field_validator("*", mode="after")
    @classmethod
    def _utc_times(cls, value: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value

    @classmethod
    def from_attributes(cls, row: object, **computed: Any) -> Self:
        """The model of `row`: each field is the row's attribute of the same name, except
        those given in `computed` (renamed or derived columns). So a field added here is
        shown as soon as the row has it, and a `from_row` lists only what differs."""
        fields = {name: getattr(row, name) for name in cls.model_fields if name not in computed}
        return cls(**fields, **computed)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable and machine-readable, e.g. `not_found`.")
    message: str = Field(description="What went wrong and how to fix it.")
    param: str | None = Field(description="The request field at fault (dotted), or null.")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer (api/errors.py)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class ErrorInfo(BaseModel):
    code: str
    message: str | None

    @classmethod
    def of(cls, row: Dataset | Job | EmbeddingJob) -> ErrorInfo | None:
        """The row's error code and message; None while it has not failed."""
        return cls(code=row.error_code, message=row.error_message) if row.error_code else None


# --------------------------------------------------------------------------- datasets


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


# --------------------------------------------------------------------------- jobs


MAX_RANKS_PER_NODE = 64
MAX_NODES = 64


class JobResources(BaseModel):
    """What a job runs on. `gpus` ranks on each of `nodes` workers: world size gpus x nodes,
    each rank taking batch_size / (gpus x nodes) images of the global batch."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        1,
        ge=1,
        le=MAX_RANKS_PER_NODE,
        description="Ranks per node: GPUs, or CPU processes (gloo) on a worker without a GPU. "
        "Only a worker that can run this many takes the job.",
    )
    nodes: int = Field(
        1,
        ge=1,
        le=MAX_NODES,
        description="Workers (machines) that train the job together; it starts once this "
        "many have claimed it.",
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dataset_id: str = Field(max_length=40)
    name: str | None = Field(None, max_length=200)
    preset: PresetName | None = Field(
        None,
        description="`auto` (the default, also for null): a recipe chosen from the dataset, "
        "the workers and `config.budget_s`, with a reason per choice (see `dry_run`); or a "
        "named preset: imagenet-800ep, imagenet-100ep and small-batch are the paper's "
        "recipes, cpu-tiny a seconds-long demo.",
    )
    config: ConfigOverrides = Field(
        default_factory=ConfigOverrides,
        description="TrainConfig fields that override the preset, each with its bounds; "
        "`budget_s` (seconds of training) replaces `epochs`: the schedule is fitted to end "
        "with the budget. The combination is checked when the job's config is resolved.",
    )
    dry_run: bool = Field(
        False,
        description="Answer the resolved config, the reason for each auto choice and the "
        "estimated time and memory on the workers that fit (200, JobPlanPublic); queue nothing.",
    )
    metadata: dict[str, Any] | None = Field(None, description="Free-form, returned as given.")
    keep_best_by: QualityMetric | None = Field(
        None,
        description="Keep the checkpoint best by this quality metric besides the newest ones "
        "(the dataset needs class folders; checkpoints are evaluated as they are saved).",
    )
    max_attempts: int = Field(
        3, ge=1, le=20, description="Runs after a lost worker before failing with worker_lost."
    )
    max_runtime_s: float | None = Field(
        None, gt=0, description="Running time over all attempts before failing with timeout."
    )
    resources: JobResources = Field(default_factory=JobResources)

    def overrides(self) -> dict[str, Any]:
        """The config fields the request set (JSON values), for resolve_config."""
        fields: dict[str, Any] = self.config.model_dump(mode="json", exclude_unset=True)
        return fields


class CostEstimatePublic(BaseModel):
    device: str
    machine: str
    machine_gflops: float = Field(description="The worker's measured training GFLOP/s.")
    workers: int = Field(description="Live workers with this profile (0: assumed machine).")
    gflops_per_image: float
    seconds_per_epoch: float
    total_seconds: float
    peak_memory_gib: float = Field(description="Per rank: weights, optimiser, activations.")
    fits_memory: bool


class JobPlanPublic(BaseModel):
    """What `POST /v1/jobs` with `dry_run` answers: nothing is created or queued."""

    dry_run: Literal[True] = True
    preset: PresetName
    config: TrainConfig = Field(description="The resolved, complete config.")
    reasons: dict[str, str] = Field(description="Why auto chose each field it set.")
    dataset_stats: dict[str, Any] | None
    estimates: list[CostEstimatePublic]


class Progress(BaseModel):
    step: int
    total_steps: int | None
    epoch: int
    epochs: int


class JobPublic(PublicModel):
    id: str
    name: str | None
    dataset_id: str
    preset: PresetName | None
    status: JobStatus
    progress: Progress
    metrics: dict[str, Any] | None
    eta_s: float | None
    attempt: int
    error: ErrorInfo | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    config: TrainConfig = Field(description="The resolved, complete config.")
    metadata: dict[str, Any] | None
    compute_seconds: float
    keep_best_by: str | None
    max_attempts: int
    max_runtime_s: float | None
    resources: JobResources

    @classmethod
    def from_row(cls, row: Job) -> JobPublic:
        return cls.from_attributes(
            row,
            progress=Progress(
                step=row.step, total_steps=row.total_steps, epoch=row.epoch, epochs=row.epochs
            ),
            error=ErrorInfo.of(row),
            metadata=row.user_metadata,  # `metadata` on a row is SQLAlchemy's table registry
            resources=JobResources(gpus=row.gpus, nodes=row.nodes),
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


# --------------------------------------------------------------------------- events


class EventPublic(PublicModel):
    seq: int = Field(description="1, 2, 3, ... within the job; the SSE `id`.")
    type: str
    data: dict[str, Any]
    created_at: datetime

    @classmethod
    def from_row(cls, row: JobEvent) -> EventPublic:
        return cls.from_attributes(row)


class EventsPublic(BaseModel):
    data: list[EventPublic]
    next_cursor: str | None = Field(description="Pass as `after` for the next page; null last.")


# --------------------------------------------------------------------------- checkpoints


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
    created_at: datetime

    @classmethod
    def from_row(cls, row: Checkpoint) -> CheckpointPublic:
        return cls.from_attributes(row)


class CheckpointsPublic(BaseModel):
    data: list[CheckpointPublic]
    next_cursor: str | None


# --------------------------------------------------------------------------- embedding jobs


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


# --------------------------------------------------------------------------- usage


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


# --------------------------------------------------------------------------- health


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    broker: str
