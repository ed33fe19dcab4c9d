"""`TrainConfig`: every hyperparameter of a SwAV run, in one frozen pydantic model.

The defaults are the paper's ImageNet settings (Caron et al., 2020, section 4 and
appendix A; facebookresearch/swav `main_swav.py`). The same model is used by the CLI,
the API and the worker, so a config is validated once, with the same messages, wherever
it comes from. `batch_size` is the GLOBAL batch (all ranks together); each rank takes
`batch_size / world_size`.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator
from pydantic.fields import FieldInfo

from swav_core.errors import ConfigError

Optimizer = Literal["lars", "sgd", "adamw"]
Precision = Literal["fp32", "bf16", "fp16"]
FreezeUnit = Literal["iterations", "epochs"]


class TrainConfig(BaseModel):
    """All hyperparameters of one SwAV pretraining run (frozen; unknown keys rejected)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)

    # model
    backbone: str = Field("resnet50", description="Backbone name; see swav_core.model.")
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
    nmb_crops: tuple[int, ...] = Field((2, 6), description="Crops per resolution group.")
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

    @property
    def total_crops(self) -> int:
        return sum(self.nmb_crops)

    @field_validator("nmb_crops")
    @classmethod
    def _positive_crop_counts(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(n < 1 for n in value):
            raise ValueError(f"nmb_crops={list(value)}: give at least one group, each >= 1")
        if sum(value) < 2:
            raise ValueError(
                f"nmb_crops={list(value)}: the swapped prediction needs at least 2 crops"
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
        counts = info.data.get("nmb_crops")
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
                    f"nmb_crops={list(counts)} valid indices are 0..{total - 1}"
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
    counts = info.data.get("nmb_crops")
    if counts is not None and len(value) != len(counts):
        raise ValueError(
            f"{name} has {len(value)} entries but nmb_crops={list(counts)} has {len(counts)}: "
            "give one value per resolution group"
        )


PRESETS: dict[str, dict[str, Any]] = {
    # The paper's best ImageNet setting, as facebookresearch/swav's
    # scripts/swav_800ep_pretrain.sh runs it: 2x224 + 6x96, batch 4096 (64 GPUs x 64),
    # 800 epochs, LARS (apex LARC, every parameter) with warm-up from 0.3 over 10 epochs.
    "imagenet-800ep": {
        "backbone": "resnet50",
        "epochs": 800,
        "batch_size": 4096,
        "base_lr": 4.8,
        "final_lr": 0.0048,
        "start_warmup_lr": 0.3,
        "warmup_epochs": 10,
        "freeze_prototypes": 313,
        "queue_length": 0,
        "optimizer": "lars",
        "lars_exclude_bias_bn": False,
        "precision": "bf16",
    },
    # scripts/swav_200ep_bs256_pretrain.sh: batch 256, a 3840-feature queue from epoch 15,
    # prototypes frozen for the first 5005 iterations, no warm-up.
    "small-batch": {
        "backbone": "resnet50",
        "epochs": 200,
        "batch_size": 256,
        "base_lr": 0.6,
        "final_lr": 0.0006,
        "warmup_epochs": 0,
        "queue_length": 3840,
        "epoch_queue_starts": 15,
        "freeze_prototypes": 5005,
        "precision": "bf16",
    },
    # Seconds on a laptop CPU: tiny CNN, 32 px images, few prototypes. For demos and tests.
    "cpu-tiny": {
        # Small images and a small batch want milder crops than ImageNet's (0.05 of a
        # 32 px image is a 7 px patch), fewer prototypes than samples per batch (each
        # prototype then takes ~2 samples) and a sharper Sinkhorn (eps 0.03): with the
        # ImageNet values the tiny CNN settles at uniform codes, i.e. loss ln K.
        "backbone": "tiny_cnn",
        "hidden_mlp": 128,
        "feat_dim": 32,
        "n_prototypes": 16,
        "epsilon": 0.03,
        "nmb_crops": (2, 2),
        "size_crops": (32, 24),
        "min_scale_crops": (0.4, 0.2),
        "max_scale_crops": (1.0, 0.5),
        "color_jitter_strength": 0.5,
        "epochs": 4,
        "batch_size": 32,
        "base_lr": 0.1,
        "final_lr": 0.001,
        "warmup_epochs": 0.5,
        "weight_decay": 1e-5,
        "optimizer": "sgd",
        "freeze_prototypes": 10,
        "queue_length": 0,
        "epoch_queue_starts": 0,
        "num_workers": 0,
        "precision": "fp32",
        "checkpoint_every_epochs": 1,
        "log_every_steps": 1,
    },
}


# scripts/swav_100ep_pretrain.sh: the 800-epoch recipe for 100 epochs.
PRESETS["imagenet-100ep"] = {**PRESETS["imagenet-800ep"], "epochs": 100}


def preset_names() -> list[str]:
    return sorted(PRESETS)


# What a job request may name as its preset: `auto` (swav_core.recipe, the default) or a
# key of PRESETS; tests/core/test_config.py keeps the two in step.
PresetName = Literal["auto", "cpu-tiny", "imagenet-100ep", "imagenet-800ep", "small-batch"]


def _all_optional(model: type[BaseModel], name: str) -> type[BaseModel]:
    """`model` with every field optional (default None), keeping its type, bounds and
    description, so that a schema of overrides documents what the full model checks."""
    fields: dict[str, Any] = {
        field: (Optional[info.annotation], FieldInfo.merge_field_infos(info, default=None))  # noqa: UP045
        for field, info in model.model_fields.items()
    }
    return create_model(
        name,
        __config__=ConfigDict(extra="forbid"),
        __doc__=f"Any subset of {model.__name__}'s fields; each overrides the preset's value.",
        **fields,
    )


# The `config` of a job request: TrainConfig fields that override the preset. Each field
# is checked on its own here; the combination is checked as a TrainConfig when the job's
# config is resolved (swav_core.recipe.resolve_config).
TrainConfigOverrides = _all_optional(TrainConfig, "TrainConfigOverrides")


def config_from(preset: str | None = None, **overrides: Any) -> TrainConfig:
    """A validated `TrainConfig`: the paper's defaults, then a named preset, then overrides.

    Raises `KeyError` naming the known presets when `preset` is unknown.
    """
    base: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise KeyError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names())}")
        base = dict(PRESETS[preset])
    return TrainConfig.model_validate({**base, **overrides})


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str) -> float:
    """Seconds from `1200`, `90s`, `20m`, `1h30m` or `2h` (a `budget_s` as people write it).

    Raises ValueError naming the accepted forms.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration: give seconds, or e.g. 20m, 1h30m, 90s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ValueError(f"{text!r}: a budget must be more than 0 seconds")
    return total


# ------------------------------------------------------------------------ --set key=value

_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})
# The accepted forms, as the error messages name them.
_FORMS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer, e.g. 10",
    float: "a number, e.g. 0.1",
}
_LIST_FORMS: dict[Any, str] = {
    int: "integers separated by commas, e.g. 224,96",
    float: "numbers separated by commas, e.g. 0.14,0.05",
}


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`TrainConfig` overrides from `key=value` texts (`--set` of `swav-train` and `swav jobs
    submit`), each value read as its field's type.

    `epochs=3` gives 3, `base_lr=0.1` 0.1, `checkpoint_at_start=true` True (also yes/no,
    on/off, 1/0), `size_crops=32,24` (or `[32,24]`) the list [32, 24], `budget_s=none` None
    where the field is optional, and `precision=bf16` the text when it is one of the allowed
    values. Tuples come back as lists so that the dict is JSON as it is (the client sends
    it to the API); `TrainConfig` makes them tuples again. Only the types are checked here:
    ranges and consistency stay with `TrainConfig`, so that the CLI and the API report them
    with the same messages.

    Raises ConfigError naming the key, the value and the accepted form, or, for an unknown
    key, the fields with close names.
    """
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write key=value, e.g. --set epochs=10")
        settings[key] = parse_setting(key, text)
    return settings


def parse_setting(key: str, text: str) -> Any:
    """The value of TrainConfig field `key` written as `text` (see `parse_settings`)."""
    field = TrainConfig.model_fields.get(key)
    if field is None:
        close = difflib.get_close_matches(key, TrainConfig.model_fields, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "not a TrainConfig field"
        raise ConfigError(f"--set {key}={text}: unknown key {key!r}; {hint}")
    try:
        return _coerce(field.annotation, text)
    except ValueError as error:
        raise ConfigError(f"--set {key}={text}: expected {error}") from None


def _coerce(annotation: Any, text: str) -> Any:
    """`text` as a value of the type `annotation`; ValueError names the accepted form."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):  # only `X | None` among TrainConfig's fields
        (inner,) = (a for a in args if a is not type(None))
        if text.lower() in _NONE:
            return None
        try:
            return _coerce(inner, text)
        except ValueError as error:
            raise ValueError(f"{error}, or none") from None
    if origin is Literal:
        if text not in args:
            raise ValueError(f"one of {', '.join(map(str, args))}")
        return text
    if origin is tuple:
        item = args[0]
        parts = [p.strip() for p in text.strip("[]()").split(",")] if text.strip("[]() ") else []
        try:
            return [_coerce(item, part) for part in parts]
        except ValueError:
            raise ValueError(_LIST_FORMS[item]) from None
    if annotation is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(_FORMS[bool])
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(_FORMS[annotation]) from None
    return text

