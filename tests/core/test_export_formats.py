"""Each export loads where its users load it, with none of this package, and gives our
backbone's eval features: timm's `create_model(checkpoint_path=...)`, torchvision's model
with its classifier an Identity (strict), and onnxruntime (dynamic batch)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import timm
import torch
import torchvision
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from swav_core.config import TrainConfig
from swav_core.embed import embed
from swav_core.export_formats import EXPORT_SUFFIX, export_formats, format_problem
from swav_core.exports import write_export
from swav_core.model import SwAVModel
from swav_core.onnx_export import OPSET, export_backbone_onnx
from swav_core.presets import config_from

SIZE = 32
BACKBONES = (
    "resnet18",
    "timm/convnext_atto",
    "timm/efficientnet_b0",
    "timm/vit_tiny_patch16_224",
    "torchvision/efficientnet_b0",
)


@pytest.fixture(scope="module", params=BACKBONES)
def trained(request: pytest.FixtureRequest) -> SwAVModel:
    """A tiny-headed SwAV model whose batch-norm statistics moved off their defaults."""
    torch.manual_seed(0)
    model = SwAVModel(request.param, hidden_mlp=16, feat_dim=8, n_prototypes=5, input_size=SIZE)
    model.train()
    with torch.no_grad():
        model([torch.randn(4, 3, SIZE, SIZE) * 2 + 0.5])
    return model.eval()


def features(model: SwAVModel, images: torch.Tensor) -> torch.Tensor:
    return embed(model, images, layer="backbone", normalize=False)


def config_of(model: SwAVModel) -> TrainConfig:
    config = config_from(
        "cpu-tiny", backbone=model.backbone_name, hidden_mlp=16, feat_dim=8, n_prototypes=5
    )
    assert config.size_crops[0] == SIZE
    return config


def test_formats_by_backbone() -> None:
    assert export_formats("resnet18") == ("full", "safetensors", "backbone", "onnx")
    assert export_formats("small_resnet10_w16") == export_formats("resnet18")
    assert export_formats("torchvision/efficientnet_b0") == export_formats("resnet18")
    assert export_formats("timm/convnext_atto") == ("full", "safetensors", "timm", "onnx")
    assert format_problem("timm/convnext_atto", "timm") is None
    problem = format_problem("timm/convnext_atto", "backbone")
    assert problem is not None and "full, safetensors, timm, onnx" in problem
    problem = format_problem("resnet18", "timm")
    assert problem is not None and "full, safetensors, backbone, onnx" in problem


def test_weights_export_loads_in_its_tool(trained: SwAVModel, tmp_path: Path) -> None:
    name = trained.backbone_name
    family, _, model_name = name.rpartition("/")
    fmt = "timm" if family == "timm" else "backbone"
    path = tmp_path / f"step{EXPORT_SUFFIX[fmt]}"
    write_export(trained, config_of(trained), fmt, path)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["backbone"] == name

    if fmt == "timm":
        kwargs = json.loads(metadata["timm_kwargs"])
        vit = model_name.startswith("vit_")
        assert kwargs == ({"img_size": SIZE, "dynamic_img_size": True} if vit else {})
        loaded = timm.create_model(
            model_name, pretrained=False, num_classes=0, checkpoint_path=str(path), **kwargs
        )
    else:
        loaded = torchvision.models.get_model(model_name, weights=None)
        if model_name == "resnet18":
            loaded.fc = nn.Identity()
        else:  # the documented way for efficientnet_b0: its last Linear
            loaded.classifier[1] = nn.Identity()
        loaded.load_state_dict(load_file(path), strict=True)
    loaded.eval()

    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        theirs = loaded(images)
    torch.testing.assert_close(theirs, features(trained, images), rtol=0, atol=1e-6)
    if fmt == "timm" and kwargs:  # built as we built it: other sizes resample the grid too
        bigger = torch.randn(2, 3, 2 * SIZE, 2 * SIZE)
        with torch.no_grad():
            theirs = loaded(bigger)
        torch.testing.assert_close(theirs, features(trained, bigger), rtol=0, atol=1e-6)


def run_onnx(path: Path, images: torch.Tensor) -> np.ndarray:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    return session.run(["features"], {"images": images.numpy()})[0]


def test_onnx_export_runs_in_onnxruntime(trained: SwAVModel, tmp_path: Path) -> None:
    path = tmp_path / "step.onnx"
    write_export(trained, config_of(trained), "onnx", path)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["backbone"] == trained.backbone_name
    assert props["image_size"] == str(SIZE) and props["opset"] == str(OPSET)
    assert props["exporter"] == "torchscript"
    assert not trained.training  # the export leaves the module as it was
    for batch in (2, 3):  # the batch axis is dynamic
        images = torch.randn(batch, 3, SIZE, SIZE)
        theirs = run_onnx(path, images)
        assert theirs.shape == (batch, trained.num_features)
        np.testing.assert_allclose(theirs, features(trained, images).numpy(), rtol=0, atol=1e-4)


def test_dynamo_exporter_gives_the_same_graph_outputs(tmp_path: Path) -> None:
    """The fallback exporter (used when the TorchScript one fails or is removed)."""
    torch.manual_seed(0)
    model = SwAVModel("resnet18", hidden_mlp=16, feat_dim=8, n_prototypes=5, input_size=SIZE)
    model.train()
    model([torch.randn(4, 3, SIZE, SIZE)])
    model.eval()
    path = tmp_path / "dynamo.onnx"
    assert export_backbone_onnx(model.backbone, path, SIZE, "resnet18", "dynamo") == "dynamo"
    assert not list(tmp_path.glob(".onnx-*"))  # its scratch folder is gone
    images = torch.randn(3, 3, SIZE, SIZE)
    np.testing.assert_allclose(
        run_onnx(path, images), features(model, images).numpy(), rtol=0, atol=1e-4
    )


def test_write_export_refuses_a_format_that_does_not_apply(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = config_from("cpu-tiny", hidden_mlp=16, feat_dim=8, n_prototypes=5)
    model = SwAVModel.from_config(config)
    with pytest.raises(ValueError, match="use one of full, safetensors, backbone, onnx"):
        write_export(model, config, "timm", tmp_path / "x.timm.safetensors")
    assert not list(tmp_path.iterdir())
