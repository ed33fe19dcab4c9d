"""Stored configs of an older version still load (swav_core/config_versions.py): a rename
is migrated on read, a newer version is refused by name, not misread."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from swav_core.config import TrainConfig, TrainConfigOverrides
from swav_core.config_parsing import parse_settings
from swav_core.exports import export_model_safetensors, load_model, model_from_checkpoint
from swav_core.model import SwAVModel
from swav_core.presets import config_from

# cpu-tiny as version 1 stored it (a job row, a checkpoint's state), written out by hand.
CPU_TINY_V1: dict[str, Any] = {
    "backbone": "tiny_cnn", "hidden_mlp": 128, "feat_dim": 32, "n_prototypes": 16,
    "channels_last": True, "temperature": 0.1, "epsilon": 0.03, "sinkhorn_iterations": 3,
    "nmb_crops": [2, 2], "size_crops": [32, 24], "min_scale_crops": [0.4, 0.2],
    "max_scale_crops": [1.0, 0.5], "crops_for_assign": [0, 1], "color_jitter_strength": 0.5,
    "freeze_prototypes": 10, "freeze_prototypes_unit": "iterations", "epochs": 4,
    "budget_s": None, "batch_size": 32, "queue_length": 0, "epoch_queue_starts": 0,
    "base_lr": 0.1, "final_lr": 0.001, "start_warmup_lr": 0.0, "warmup_epochs": 0.5,
    "weight_decay": 1e-5, "momentum": 0.9, "optimizer": "sgd", "lars_eta": 0.001,
    "lars_exclude_bias_bn": False, "precision": "fp32", "sync_bn": True, "seed": 31,
    "num_workers": 0, "deterministic": False, "checkpoint_every_steps": 0,
    "checkpoint_every_epochs": 1, "keep_last": 2, "checkpoint_at_start": False,
    "log_every_steps": 1,
}


def test_a_version_1_config_reads_as_the_current_one() -> None:
    config = TrainConfig.model_validate(CPU_TINY_V1)
    assert config == config_from("cpu-tiny")
    assert config.n_crops == (2, 2) and config.config_version == 2
    dumped = config.model_dump(mode="json")
    assert "nmb_crops" not in dumped and dumped["config_version"] == 2
    assert TrainConfig.model_validate_json(json.dumps(dumped)) == config


def test_a_config_from_a_newer_version_is_refused_by_name() -> None:
    with pytest.raises(ValidationError, match="config_version=3 was written by a newer"):
        TrainConfig.model_validate({**CPU_TINY_V1, "config_version": 3})


def test_old_and_new_name_together_is_an_error() -> None:
    with pytest.raises(ValidationError, match="nmb_crops was renamed n_crops"):
        TrainConfig.model_validate({**CPU_TINY_V1, "n_crops": [2, 2]})


def test_a_request_and_set_may_still_use_the_old_name() -> None:
    assert TrainConfigOverrides.model_validate({"nmb_crops": [2, 4]}).n_crops == (2, 4)  # type: ignore[attr-defined]
    assert parse_settings(["nmb_crops=2,4"]) == {"n_crops": [2, 4]}
    with pytest.raises(ValidationError):  # the version is the code's own, not a request's
        TrainConfigOverrides.model_validate({"config_version": 2})


def test_a_checkpoint_and_an_export_written_by_version_1_load(tmp_path: Path) -> None:
    config = TrainConfig.model_validate(CPU_TINY_V1)
    model = SwAVModel.from_config(config)
    loaded, read = model_from_checkpoint({"model": model.state_dict(), "config": CPU_TINY_V1})
    assert read == config

    path = tmp_path / "model.safetensors"
    export_model_safetensors(model, config, path)
    metadata = {"format": "pt", "swav_config": json.dumps(CPU_TINY_V1)}
    save_file(load_file(str(path)), str(path), metadata=metadata)
    reloaded, read = load_model(path)
    assert read == config
    for name, tensor in model.state_dict().items():
        assert reloaded.state_dict()[name].equal(tensor), name
