"""One backbone of each family through the engine: train, checkpoint, resume, embed.

Covers our bare torchvision ResNet name, timm CNNs (ConvNeXt, EfficientNet), a timm ViT
whose small crops use resampled position embeddings, and a torchvision model by
`torchvision/<name>`; plus the name catalog against the installed libraries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from swav_core.backbone_catalog import CATALOG_PATH, installed_catalog
from swav_core.backbone_families import check_crop_sizes
from swav_core.checkpoint import load_checkpoint
from swav_core.config import TrainConfig
from swav_core.costs import Machine
from swav_core.crop_fit import fitted_crop_sizes
from swav_core.embed import embed
from swav_core.errors import ConfigError
from swav_core.exports import load_model
from swav_core.model import SwAVModel, create_backbone
from swav_core.presets import config_from
from swav_core.recipe import DatasetStats, resolve_config
from swav_core.synthetic import write_shapes_dataset
from swav_core.trainer import train

FAMILIES = {
    "resnet18": (32, 16),
    "timm/convnext_atto": (64, 32),
    "timm/efficientnet_b0": (32, 16),
    "timm/vit_tiny_patch16_224": (32, 16),
    "torchvision/efficientnet_b0": (32, 16),
}


def family_config(backbone: str, **overrides: Any) -> TrainConfig:
    sizes = FAMILIES[backbone]
    return config_from(
        "cpu-tiny",
        backbone=backbone,
        size_crops=sizes,
        n_crops=(2, 2),
        batch_size=16,
        epochs=1,
        checkpoint_every_epochs=0,
        **overrides,
    )


@pytest.fixture(scope="module")
def family_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shapes_dataset(tmp_path_factory.mktemp("families"), per_class=8, size=32)


@pytest.mark.parametrize("backbone", sorted(FAMILIES))
def test_each_family_trains_resumes_and_embeds(
    backbone: str, family_images: Path, tmp_path: Path
) -> None:
    config = family_config(backbone)
    run = tmp_path / "run"
    steps = iter(range(1, 100))
    first = train(config, family_images, run, should_stop=lambda: next(steps) >= 1)
    assert (first.status, first.step) == ("stopped", 1)
    assert first.checkpoint is not None
    assert load_checkpoint(first.checkpoint.path)["step"] == 1

    second = train(config, family_images, run)
    assert (second.status, second.step) == ("completed", 2)  # 32 images at batch 16
    assert second.loss is not None and torch.isfinite(torch.tensor(second.loss))

    model, loaded_config = load_model(run / "checkpoints" / "final.pt")
    assert loaded_config.backbone == backbone
    size = loaded_config.size_crops[0]
    images = torch.rand(3, 3, size, size)
    features = embed(model, images, size=size)
    assert features.shape == (3, model.num_features)
    torch.testing.assert_close(features.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    raw = model.backbone(images)
    torch.testing.assert_close(features, torch.nn.functional.normalize(raw, dim=1))


def test_the_feature_width_is_read_from_the_model() -> None:
    """timm's MobileNetV3 says num_features=288 but pools 1024 wide after its head conv."""
    backbone = create_backbone("timm/mobilenetv3_small_050", 32)
    assert backbone.num_features == 1024
    assert backbone(torch.zeros(2, 3, 32, 32)).shape == (2, 1024)
    with torch.device("meta"):  # the cost model builds on the meta device: no real forward
        assert SwAVModel("timm/vit_tiny_patch16_224", 0, 8, 4, 32).num_features == 192


def test_a_crop_the_backbone_cannot_take_is_a_config_error_naming_it() -> None:
    backbone = create_backbone("timm/convnext_atto", 64)
    with pytest.raises(ConfigError, match=r"timm/convnext_atto cannot take 16 px crops"):
        check_crop_sizes(backbone, "timm/convnext_atto", (64, 16))
    with torch.device("meta"):  # torchvision's ViT takes one size only
        fixed = create_backbone("torchvision/vit_b_16", 224)
    with pytest.raises(ConfigError, match=r"torchvision/vit_b_16 cannot take 96 px crops"):
        check_crop_sizes(fixed, "torchvision/vit_b_16", (224, 96))


def test_the_catalog_is_the_installed_libraries_names() -> None:
    """swav_core/backbone_catalog.json, read by the API without torch, lists exactly what the
    installed timm and torchvision build (`python -m swav_core.backbone_catalog` remakes it)."""
    assert json.loads(CATALOG_PATH.read_text()) == installed_catalog()


def test_crop_sides_are_raised_to_ones_the_backbone_takes() -> None:
    """ConvNeXt needs 32 px at least; a ViT's sides are multiples of its patch (16)."""
    assert fitted_crop_sizes("timm/convnext_atto", (28, 24)) == (33, 32)
    assert fitted_crop_sizes("timm/vit_tiny_patch16_224", (28, 12)) == (32, 16)
    assert fitted_crop_sizes("timm/vit_tiny_patch16_224", (28, 24)) == (48, 32)
    assert fitted_crop_sizes("resnet18", (28, 12)) == (28, 12)  # takes them: unchanged
    with pytest.raises(ConfigError, match="Expected 224 but got 96"):
        fitted_crop_sizes("torchvision/vit_b_16", (224, 96))


def test_auto_with_a_given_backbone_picks_crops_it_takes() -> None:
    stats = DatasetStats(num_images=500, num_classes=10, median_short_side=28)
    cpu = Machine("cpu", gflops=100.0, precision="fp32", cpu_cores=2)
    config, reasons = resolve_config(None, {"backbone": "timm/convnext_atto"}, stats, cpu)
    assert config.size_crops == (33, 32)
    assert "raised to the nearest sides timm/convnext_atto takes" in reasons["size_crops"]
    check_crop_sizes(create_backbone(config.backbone, 33), config.backbone, config.size_crops)
