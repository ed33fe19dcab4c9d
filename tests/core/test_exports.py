"""Model exports: a torchvision-loadable backbone, the whole model with its config, and the
model rebuilt from a training checkpoint's state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from swav_core.embed import embed
from swav_core.errors import CheckpointError
from swav_core.exports import (
    export_backbone_safetensors,
    export_model_safetensors,
    load_model_safetensors,
    model_from_checkpoint,
)
from swav_core.model import SwAVModel
from swav_core.presets import config_from


def model_state() -> dict[str, Any]:
    """The two keys of a training checkpoint that `model_from_checkpoint` reads."""
    torch.manual_seed(0)
    config = config_from("cpu-tiny", hidden_mlp=16, feat_dim=8, n_prototypes=10)
    model = SwAVModel.from_config(config)
    return {"model": model.state_dict(), "config": config.model_dump(mode="json")}


def test_model_from_checkpoint_strips_ddp_prefix(tmp_path: Path) -> None:
    state = model_state()
    state["model"] = {f"module.{k}": v for k, v in state["model"].items()}
    model, _ = model_from_checkpoint(state)
    assert set(model.state_dict()) == {k.removeprefix("module.") for k in state["model"]}


def test_backbone_export_loads_strictly_into_torchvision(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = SwAVModel("resnet18", 32, 16, 10)
    model.train()
    model([torch.randn(4, 3, 64, 64)])  # move the BN running stats away from their defaults
    path = tmp_path / "backbone.safetensors"
    export_backbone_safetensors(model, path, backbone_name="resnet18")

    with safe_open(str(path), framework="pt") as file:
        assert file.metadata() == {"format": "pt", "backbone": "resnet18"}
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(load_file(path), strict=True)
    reference.eval()

    x = torch.randn(2, 3, 64, 64)
    expected = embed(model, x, layer="backbone", normalize=False)
    with torch.no_grad():
        actual = reference(x)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)


def test_full_model_export_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = config_from("cpu-tiny", hidden_mlp=16, feat_dim=8, n_prototypes=10)
    model = SwAVModel.from_config(config)
    model.train()
    model([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    path = tmp_path / "model.safetensors"
    export_model_safetensors(model, config, path)

    loaded, loaded_config = load_model_safetensors(path)
    assert loaded_config == config
    assert not loaded.training
    model.eval()
    crops = [torch.randn(3, 3, 16, 16), torch.randn(3, 3, 8, 8)]
    with torch.no_grad():
        for ours, theirs in zip(model(crops), loaded(crops), strict=True):
            torch.testing.assert_close(theirs, ours, rtol=0, atol=0)

    with pytest.raises(ValueError, match="n_prototypes"):
        export_model_safetensors(model, config.with_overrides(n_prototypes=11), path)
    export_backbone_safetensors(model, tmp_path / "backbone.safetensors")
    with pytest.raises(CheckpointError, match="swav_config"):
        load_model_safetensors(tmp_path / "backbone.safetensors")
