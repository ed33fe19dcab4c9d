"""`TrainConfig`: every hyperparameter of a SwAV run, in one frozen pydantic model.

The defaults are the paper's ImageNet settings (Caron et al., 2020, section 4 and
appendix A; facebookresearch/swav `main_swav.py`). The same model is used by the CLI,
the API and the worker, so a config is validated once, with the same messages, wherever
it comes from. `batch_size` is the GLOBAL batch (all ranks together); each rank takes
`batch_size / world_size`.

Every stored config carries `config_version`; one of an older version is read with the
renames made since (swav_core/config_versions.py), so old checkpoints and jobs still load.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo

from swav_core.backbone_names import backbone_name_problem
from swav_core.config_versions import CONFIG_VERSION, renamed, upgraded

Optimizer = Literal["lars", "sgd", "adamw"]
Precision = Literal["fp32", "bf16", "fp16"]
FreezeUnit = Literal["iterations", "epochs"]


class TrainConfig(BaseModel):
    """All hyperparameters of one SwAV pretraining run (frozen; unknown keys rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    config_version: int = Field(
        CONFIG_VERSION,
        ge=CONFIG_VERSION,
        le=CONFIG_VERSION,
        description="The version of these fields' names; an older stored config is read "
        "with its renamed fields migrated (swav_core/config_versions.py).",
    )

    # model
    backbone: str = Field(
        "resnet50",
        max_length=120,
        description="Backbone name: tiny_cnn, resnet18/34/50/101, wide_resnet50_2/101_2, "
        "small_resnet{10,18}_w{16,32,64}, any timm model as 'timm/<name>' (e.g. "
        "timm/convnext_atto) or torchvision classification model as 'torchvision/<name>' "
        "(swav_core/backbone_names.py; GET /v1/backbones lists them).",
    )
    hidden_mlp: int = Field(
        2048, ge=0, description="Hidden width of the projection head; 0 gives one Linear."
    )
    feat_dim: int = Field(128, ge=1, description="Dimension of the L2-normalised features z.")
    n_prototypes: int = Field(
        3000,
        ge=2,
        description="Number of prototypes K. About 10x the expected number of classes.",
    )
    channels_last: bool = Field(True, description="NHWC memory format; faster on CPU and GPU.")

    # method
    temperature: float = Field(0.1, gt=0, description="tau in the softmax of eq. 2.")
    epsilon: float = Field(
        0.05, gt=0, description="Entropy weight of Sinkhorn (eq. 3); lower is sharper."
    )
    sinkhorn_iterations: int = Field(3, ge=1, description="Sinkhorn-Knopp iterations.")
    n_crops: tuple[int, ...] = Field((2, 6), description="Crops per resolution group.")
    size_crops: tuple[int, ...] = Field(
        (224, 96), description="Crop side per group, largest first."
    )
    min_scale_crops: tuple[float, ...] = Field(
        (0.14, 0.05), description="Lower bound of RandomResizedCrop's area scale per group."
    )
    max_scale_crops: tuple[float, ...] = Field(
        (1.0, 0.14), description="Upper bound of RandomResizedCrop's area scale per group."
    )
    crops_for_assign: tuple[int, ...] = Field(
        (0, 1), description="Indices of the crops whose codes are computed (eq. 6)."
    )
    color_jitter_strength: float = Field(1.0, ge=0, description="s in ColorJitter(0.8s,...).")
    freeze_prototypes: int = Field(
        313, ge=0, description="Prototypes get no update for this many units (see next)."
    )
    freeze_prototypes_unit: FreezeUnit = "iterations"

    # optimisation
    epochs: int = Field(
        100, ge=1, description="Passes over the data; ignored when budget_s is set."
    )
    budget_s: float | None = Field(
        None,
        gt=0,
        description=(
            "Wall-clock seconds for the whole run instead of a number of epochs: the step "
            "time is measured in the first steps, then the schedule (warm-up and cosine) is "
            "fitted to end when the budget does and recorded in a budget_fitted event."
        ),
    )
    batch_size: int = Field(4096, ge=1, description="Global batch size over all ranks.")
    queue_length: int = Field(
        0,
        ge=0,
        description=(
            "Features kept from past batches for the assignments; 0 disables. Use one when "
            "the global batch is small (< 1024), e.g. 3840 at batch 256."
        ),
    )
    epoch_queue_starts: int = Field(15, ge=0, description="Epoch at which the queue is created.")
    base_lr: float = Field(4.8, gt=0, description="Peak learning rate after warm-up.")
    final_lr: float = Field(0.0048, ge=0, description="Learning rate at the end of the cosine.")
    start_warmup_lr: float = Field(0.0, ge=0)
    warmup_epochs: float = Field(10, ge=0)
    weight_decay: float = Field(1e-6, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    optimizer: Optimizer = "lars"
    lars_eta: float = Field(0.001, gt=0, description="LARS trust coefficient.")
    lars_exclude_bias_bn: bool = Field(
        False,
        description=(
            "Skip LARS adaptation and weight decay for biases and BN weights. The official "
            "SwAV code (apex LARC) adapts and decays every parameter, hence False."
        ),
    )
    precision: Precision = "fp32"
    sync_bn: bool = Field(True, description="SyncBatchNorm when more than one rank runs.")

    # runtime
    seed: int = 31
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes per rank.")
    deterministic: bool = Field(
        False, description="Deterministic kernels (slower); needed for bit-exact resume."
    )
    checkpoint_every_steps: int = Field(
        0, ge=0, description="Save a checkpoint every N steps; 0 saves only per epoch."
    )
    checkpoint_every_epochs: int = Field(1, ge=0, description="Save every N epochs; 0 never.")
    keep_last: int = Field(2, ge=1, description="Checkpoints kept besides the final one.")
    checkpoint_at_start: bool = Field(
        False, description="Also save the initial weights (step 0): a baseline for quality."
    )
    log_every_steps: int = Field(10, ge=1, description="Emit metric events every N steps.")

    @model_validator(mode="before")
    @classmethod
    def _read_older_versions(cls, data: Any) -> Any:
        return upgraded(data) if isinstance(data, dict) else data

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        problem = backbone_name_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @property
    def total_crops(self) -> int:
        return sum(self.n_crops)

    @field_validator("n_crops")
    @classmethod
    def _positive_crop_counts(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(n < 1 for n in value):
            raise ValueError(f"n_crops={list(value)}: give at least one group, each >= 1")
        if sum(value) < 2:
            raise ValueError(
                f"n_crops={list(value)}: the swapped prediction needs at least 2 crops"
            )
        return value

    @field_validator("size_crops")
    @classmethod
    def _sizes_match_and_sorted(
        cls, value: tuple[int, ...], info: ValidationInfo
    ) -> tuple[int, ...]:
        _check_same_length("size_crops", value, info)
        if any(s < 1 for s in value):
            raise ValueError(f"size_crops={list(value)}: sizes must be positive")
        if any(a <= b for a, b in zip(value, value[1:], strict=False)):
            raise ValueError(
                f"size_crops={list(value)}: crops must be sorted by size, largest first "
                f"and distinct, e.g. {sorted(set(value), reverse=True)}"
            )
        return value

    @field_validator("min_scale_crops")
    @classmethod
    def _min_scales(cls, value: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        _check_same_length("min_scale_crops", value, info)
        if any(not 0 < s <= 1 for s in value):
            raise ValueError(f"min_scale_crops={list(value)}: each scale must be in (0, 1]")
        return value

    @field_validator("max_scale_crops")
    @classmethod
    def _max_scales(cls, value: tuple[float, ...], info: ValidationInfo) -> tuple[float, ...]:
        _check_same_length("max_scale_crops", value, info)
        lows = info.data.get("min_scale_crops")
        if any(not 0 < s <= 1 for s in value):
            raise ValueError(f"max_scale_crops={list(value)}: each scale must be in (0, 1]")
        if lows is not None and any(hi < lo for lo, hi in zip(lows, value, strict=False)):
            raise ValueError(
                f"max_scale_crops={list(value)} is below min_scale_crops={list(lows)} "
                "for some group: each max must be >= its min"
            )
        return value

    @field_validator("crops_for_assign")
    @classmethod
    def _assign_in_range(cls, value: tuple[int, ...], info: ValidationInfo) -> tuple[int, ...]:
        counts = info.data.get("n_crops")
        if not value:
            raise ValueError("crops_for_assign is empty: give at least one crop index, e.g. [0, 1]")
        if len(set(value)) != len(value):
            raise ValueError(f"crops_for_assign={list(value)}: indices must be distinct")
        if counts is not None:
            total = sum(counts)
            bad = [i for i in value if not 0 <= i < total]
            if bad:
                raise ValueError(
                    f"crops_for_assign={list(value)}: {bad} out of range; with "
                    f"n_crops={list(counts)} valid indices are 0..{total - 1}"
                )
        return value

    @field_validator("queue_length")
    @classmethod
    def _queue_multiple_of_batch(cls, value: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if value and batch and value % batch:
            below, above = (value // batch) * batch, (value // batch + 1) * batch
            nearest = " or ".join(str(q) for q in (below, above) if q > 0)
            raise ValueError(
                f"queue_length={value} is not a multiple of the global batch_size={batch}: "
                f"use queue_length {nearest}"
            )
        return value

    def with_overrides(self, **overrides: Any) -> TrainConfig:
        """A new validated config with `overrides` applied (the model is frozen)."""
        return TrainConfig.model_validate({**self.model_dump(), **overrides})


def _check_same_length(name: str, value: tuple[Any, ...], info: ValidationInfo) -> None:
    counts = info.data.get("n_crops")
    if counts is not None and len(value) != len(counts):
        raise ValueError(
            f"{name} has {len(value)} entries but n_crops={list(counts)} has {len(counts)}: "
            "give one value per resolution group"
        )


SETTABLE_FIELDS: tuple[str, ...] = tuple(
    field for field in TrainConfig.model_fields if field != "config_version"
)
"""The fields a request, a preset or `--set` may give (the version is the code's own)."""


class _Overrides(BaseModel):
    """The base of an overrides model: unknown keys rejected, an old field name read as
    its new one (a client written before a rename)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _current_names(cls, data: Any) -> Any:
        return renamed(data) if isinstance(data, dict) else data


def _all_optional(model: type[BaseModel], name: str) -> type[BaseModel]:
    """TrainConfig's settable fields, each optional (default None) with its type, bounds
    and description, so that a schema of overrides documents what the full model checks."""
    fields: dict[str, Any] = {
        field: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))  # noqa: UP045
        for field, info in model.model_fields.items()
        if field in SETTABLE_FIELDS
    }
    return create_model(
        name,
        __base__=_Overrides,
        __doc__=f"Any subset of {model.__name__}'s fields; each overrides the preset's value.",
        **fields,
    )


# The `config` of a job request: TrainConfig fields that override the preset. Each field
# is checked on its own here; the combination is checked as a TrainConfig when the job's
# config is resolved (swav_core.recipe.resolve_config).
TrainConfigOverrides = _all_optional(TrainConfig, "TrainConfigOverrides")
