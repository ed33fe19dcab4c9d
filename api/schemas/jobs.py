"""Training jobs and their events: the request (`JobCreate`, its config being
`TrainConfig`'s overrides), the dry-run plan, and what a job and its events show."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from api.schemas.common import ErrorInfo, PublicModel
from swav_core.config import TrainConfig, TrainConfigOverrides
from swav_core.presets import PresetName
from swav_service.models import Job, JobEvent, JobStatus

if TYPE_CHECKING:  # built from TrainConfig's fields at import (swav_core/config.py)
    ConfigOverrides = BaseModel
else:
    ConfigOverrides = TrainConfigOverrides

QualityMetric = Literal["knn_top1", "linear_top1"]


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


class StartFrom(BaseModel):
    """The weights a job's fresh run starts from: exactly one of the two ids."""

    model_config = ConfigDict(extra="forbid")

    checkpoint_id: str | None = Field(
        None, max_length=40,
        description="A checkpoint of one of your jobs, still available: the whole model "
        "continues if its backbone and head shapes match, else its backbone only.",
    )
    weights_id: str | None = Field(
        None, max_length=40,
        description="Weights uploaded with POST /v1/weights: a state dict of the job's "
        "backbone (a classifier `fc.*`/`head.*` is dropped), or a model export.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Self:
        if (self.checkpoint_id is None) == (self.weights_id is None):
            raise ValueError("give exactly one of checkpoint_id and weights_id")
        return self


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
    start_from: StartFrom | None = Field(
        None,
        description="Start from a previous job's checkpoint or uploaded weights instead of "
        "random weights (a resumed run keeps its own checkpoint). Weights that do not fit "
        "the model fail the job with `invalid_weights`.",
    )

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
    start_from: StartFrom | None

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
            start_from=(
                StartFrom(checkpoint_id=row.start_checkpoint_id, weights_id=row.start_weights_id)
                if row.start_checkpoint_id or row.start_weights_id
                else None
            ),
        )


class JobsPublic(BaseModel):
    data: list[JobPublic]
    next_cursor: str | None


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
