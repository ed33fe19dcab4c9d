"""Named starting points for a `TrainConfig`: the paper's ImageNet recipes as the official
scripts run them, and `cpu-tiny` for demos and tests. A job request names one (or `auto`,
swav_core/recipe.py) and overrides any field on top.
"""

from __future__ import annotations

from typing import Any, Literal

from swav_core.config import TrainConfig

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
        "n_crops": (2, 2),
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
