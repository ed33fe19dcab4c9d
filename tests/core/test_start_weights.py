"""Starting weights: a fresh model from a checkpoint, a model export or a backbone state
dict, loaded strictly, and a run that starts from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from swav_core.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from swav_core.config import TrainConfig
from swav_core.errors import InvalidWeightsError
from swav_core.exports import export_backbone_safetensors, export_model_safetensors
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_core.start_weights import load_start_weights
from swav_core.trainer import train


def tiny(**overrides: Any) -> TrainConfig:
    return config_from("cpu-tiny", **overrides)


def trained_model(config: TrainConfig, seed: int = 0) -> SwAVModel:
    """A model whose weights and BN statistics differ from any fresh one's."""
    torch.manual_seed(seed)
    model = SwAVModel.from_config(config)
    model.train()
    with torch.no_grad():
        model([torch.randn(4, 3, 32, 32)])
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def outputs(model: SwAVModel) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(123)
    with torch.no_grad():
        return model.eval()([torch.randn(3, 3, 32, 32)])


def fresh(config: TrainConfig) -> SwAVModel:
    torch.manual_seed(99)
    return SwAVModel.from_config(config)


def test_whole_model_from_a_checkpoint_gives_identical_outputs(tmp_path: Path) -> None:
    config = tiny()
    source = trained_model(config)
    state = {"model": source.state_dict(), "config": config.model_dump(mode="json")}
    info = save_checkpoint(tmp_path / "run", state, step=7, keep_last=2)

    model = fresh(config)
    assert not torch.equal(outputs(model)[0], outputs(source)[0])
    described = load_start_weights(model, info.path)

    assert "whole model" in described
    z, scores = outputs(model)
    z_source, scores_source = outputs(source)
    assert torch.equal(z, z_source) and torch.equal(scores, scores_source)


def test_model_export_with_other_prototypes_loads_its_backbone_only(tmp_path: Path) -> None:
    source_config = tiny(n_prototypes=12)
    source = trained_model(source_config)
    path = tmp_path / "model.safetensors"
    export_model_safetensors(source, source_config, path)

    config = tiny(n_prototypes=20)
    model = fresh(config)
    prototypes_before = model.prototypes.weight.clone()
    described = load_start_weights(model, path)

    assert "backbone" in described and "start fresh" in described
    for key, value in source.backbone.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[key], value), key
    assert torch.equal(model.prototypes.weight, prototypes_before)


def test_backbone_state_dict_with_a_classifier_loads_without_it(tmp_path: Path) -> None:
    config = tiny()
    source = trained_model(config)
    path = tmp_path / "backbone.safetensors"
    export_backbone_safetensors(source, path)
    tensors = {k: v.contiguous() for k, v in source.backbone.state_dict().items()}
    tensors |= {"fc.weight": torch.randn(10, 64), "fc.bias": torch.randn(10)}
    save_file(tensors, path)

    model = fresh(config)
    described = load_start_weights(model, path)

    assert "without its classifier (fc.bias, fc.weight)" in described
    torch.manual_seed(5)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.backbone.eval()(images), source.backbone.eval()(images))


def test_wrong_shape_raises_naming_the_key(tmp_path: Path) -> None:
    config = tiny()
    tensors = {k: v.contiguous() for k, v in fresh(config).backbone.state_dict().items()}
    tensors["features.0.weight"] = torch.zeros(8, 3, 3, 3)  # the model's is (16, 3, 3, 3)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, path)

    with pytest.raises(InvalidWeightsError) as caught:
        load_start_weights(fresh(config), path)
    message = str(caught.value)
    assert caught.value.code == "invalid_weights"
    assert "features.0.weight is (8, 3, 3, 3), the model's is (16, 3, 3, 3)" in message
    assert str(tmp_path) not in message  # names the file, never the server's folder


def test_missing_and_unexpected_keys_are_named(tmp_path: Path) -> None:
    tensors = {k: v.contiguous() for k, v in fresh(tiny()).backbone.state_dict().items()}
    del tensors["features.1.running_mean"]
    tensors["layer9.weight"] = torch.zeros(2)
    path = tmp_path / "partial.safetensors"
    save_file(tensors, path)

    with pytest.raises(InvalidWeightsError, match="missing keys: features.1.running_mean"):
        load_start_weights(fresh(tiny()), path)
    with pytest.raises(InvalidWeightsError, match="unexpected keys: layer9.weight"):
        load_start_weights(fresh(tiny()), path)


def test_other_backbone_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    other = tiny(backbone="small_resnet10_w16")
    state = {"model": trained_model(other).state_dict(), "config": other.model_dump(mode="json")}
    info = save_checkpoint(tmp_path / "run", state, step=1, keep_last=2)
    with pytest.raises(InvalidWeightsError, match="backbone 'small_resnet10_w16'"):
        load_start_weights(fresh(tiny()), info.path)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(InvalidWeightsError, match="not a readable safetensors file"):
        load_start_weights(fresh(tiny()), junk)
    with pytest.raises(InvalidWeightsError, match="are gone"):
        load_start_weights(fresh(tiny()), tmp_path / "missing.pt")


def test_a_run_starts_from_a_previous_runs_final_weights(shapes_dir: Path, tmp_path: Path) -> None:
    config = tiny(epochs=1)
    train(config, shapes_dir, tmp_path / "parent")
    parent = load_checkpoint(tmp_path / "parent" / "checkpoints" / "final.pt")

    events: list[dict[str, Any]] = []
    child_config = config.model_copy(update={"checkpoint_at_start": True, "seed": 7})
    train(child_config, shapes_dir, tmp_path / "child", callbacks=[events.append],
          start_weights=tmp_path / "parent" / "checkpoints" / "final.pt")

    step0 = next(i for i in list_checkpoints(tmp_path / "child") if i.step == 0)
    child_start = load_checkpoint(step0.path)["model"]
    assert child_start.keys() == parent["model"].keys()
    for key, value in parent["model"].items():
        assert torch.equal(child_start[key], value), key
    loaded = [e for e in events if e["type"] == "start_weights"]
    assert len(loaded) == 1 and "whole model" in loaded[0]["loaded"]

    # A resumed run keeps its own checkpoint: the start weights are not applied again.
    events.clear()
    train(child_config, shapes_dir, tmp_path / "child",
          callbacks=[events.append], start_weights=tmp_path / "missing.pt")
    assert not [e for e in events if e["type"] == "start_weights"]
    assert [e for e in events if e["type"] == "resumed"]
