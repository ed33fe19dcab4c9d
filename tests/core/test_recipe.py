"""`preset: auto`: the recipe's choices follow the data, the machine and the budget, each
with a reason; counted costs agree with published figures."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from swav_core.costs import Machine, backbone_gflops, estimate, peak_memory_gib
from swav_core.recipe import (
    CPU_BACKBONES,
    MIN_EPOCHS,
    DatasetStats,
    auto_recipe,
    default_epochs,
    resolve_config,
)

CPU = Machine(device="cpu", gflops=200.0, precision="bf16", cpu_cores=2, crop_ms=1.2)
GPU = Machine(device="cuda", gflops=60_000.0, precision="bf16", cpu_cores=16, memory_gib=80)
MNIST = DatasetStats(5000, 10, 28, grayscale_fraction=1.0)
PHOTOS = DatasetStats(20_000, None, 375, grayscale_fraction=0.0)


def test_resnet_flops_match_the_published_counts() -> None:
    # torchvision's model docs: ResNet-50 4.09 GFLOPS and ResNet-18 1.81 at 224 px,
    # counting multiply-adds; the counter counts each as 2 FLOPs.
    assert backbone_gflops("resnet50", 224, 224) / 2 == pytest.approx(4.09, rel=0.01)
    assert backbone_gflops("resnet18", 224, 224) / 2 == pytest.approx(1.81, rel=0.01)


def test_small_image_recipe_on_a_cpu() -> None:
    recipe = auto_recipe(MNIST, CPU, budget_s=600)
    config = recipe.config()
    assert config.size_crops == (28, 24) and config.n_crops == (2, 2)
    assert config.min_scale_crops == (0.5, 0.3) and config.max_scale_crops == (1.0, 0.6)
    assert config.n_prototypes == 100  # 10 per class
    assert config.color_jitter_strength == 0.5  # grayscale
    assert config.backbone in CPU_BACKBONES and config.budget_s == 600
    assert config.precision == "bf16" and config.optimizer == "sgd"
    assert set(recipe.reasons) == set(recipe.fields)  # a reason for every choice
    assert "grayscale" in recipe.reasons["color_jitter_strength"]


def test_large_photos_on_a_gpu_get_the_paper_crops_and_resnet50() -> None:
    config = auto_recipe(PHOTOS, GPU, ranks=8, budget_s=6 * 3600).config()
    assert config.size_crops == (224, 96) and config.n_crops == (2, 6)
    assert config.min_scale_crops == (0.14, 0.05) and config.max_scale_crops == (1.0, 0.14)
    assert config.backbone == "resnet50"
    assert config.n_prototypes == 400  # one per 50 images, no classes
    assert config.batch_size == 512 and config.color_jitter_strength == 1.0


def test_a_smaller_budget_takes_a_narrower_backbone_with_enough_epochs() -> None:
    widths = [auto_recipe(MNIST, CPU, budget_s=b).config().backbone for b in (30, 600, 36000)]
    assert widths == sorted(widths, key=CPU_BACKBONES.index)
    assert widths[0] != widths[-1]
    for budget in (30, 600, 36000):
        config = auto_recipe(MNIST, CPU, budget_s=budget).config()
        if config.backbone != CPU_BACKBONES[0]:  # the narrowest is taken whatever it costs
            per_epoch = estimate(config, MNIST.num_images, CPU, 1, 28 * 28).seconds_per_epoch
            assert budget / per_epoch >= MIN_EPOCHS


def test_without_a_budget_epochs_follow_the_dataset_size() -> None:
    assert default_epochs(50_000) == 100
    assert default_epochs(5000) == 316
    assert default_epochs(1_281_167) == 30
    assert auto_recipe(MNIST, CPU).config().epochs == 316


def test_prototypes_follow_the_classes_and_at_least_the_size() -> None:
    assert auto_recipe(MNIST, CPU).config().n_prototypes == 100  # 10 classes x 10 = 5000/50
    elpv = DatasetStats(2624, 2, 300, 1.0)
    assert auto_recipe(elpv, CPU).config().n_prototypes == 52  # 2624 / 50 > 2 x 10
    tiny = DatasetStats(200, None, 32)
    assert auto_recipe(tiny, CPU).config().n_prototypes == 30  # the floor


def test_overrides_win_and_are_reported_as_given() -> None:
    config, reasons = resolve_config(None, {"backbone": "resnet18", "epochs": 3}, MNIST, CPU)
    assert config.backbone == "resnet18" and config.epochs == 3
    assert reasons["backbone"] == "given in the request"
    assert reasons["n_prototypes"].startswith("10 per class")
    named, none = resolve_config("cpu-tiny", {"epochs": 2}, None, None)
    assert named.backbone == "tiny_cnn" and none == {}
    with pytest.raises(ValidationError):
        resolve_config("auto", {"epochs": 0}, MNIST, CPU)
    with pytest.raises(ValueError, match="needs the dataset"):
        resolve_config("auto", {}, None, CPU)


def test_memory_grows_with_the_batch_and_halves_in_bf16() -> None:
    config = auto_recipe(PHOTOS, GPU, ranks=1, budget_s=3600).config()
    small = peak_memory_gib(config.with_overrides(batch_size=32), 1)
    large = peak_memory_gib(config.with_overrides(batch_size=64), 1)
    fp32 = peak_memory_gib(config.with_overrides(batch_size=64, precision="fp32"), 1)
    assert large > small and fp32 > large
    # ResNet-50 with 2x224 + 6x96 crops: roughly 0.3 GiB of fp32 activations per image
    assert 0.1 < (fp32 - large) / 64 / 0.5 < 0.6


def test_derived_choices_follow_the_fields_the_user_gave() -> None:
    config, _ = resolve_config(None, {"epochs": 20, "backbone": "small_resnet10_w16"},
                               MNIST, CPU)
    assert config.epochs == 20 and config.backbone == "small_resnet10_w16"
    assert config.warmup_epochs == pytest.approx(1.0)  # 5% of the given 20 epochs
    assert config.freeze_prototypes == max(20, round(0.02 * 20 * 5000 / 32))
    batch, _ = resolve_config(None, {"batch_size": 64}, MNIST, CPU)
    assert batch.base_lr == pytest.approx(0.2)  # scaled from 0.1 at 32


def test_a_backbone_without_batch_norm_gets_adamw() -> None:
    """ConvNeXt and ViTs (LayerNorm only) get AdamW at 3e-4 x sqrt(batch / 32); networks
    with batch norm keep SGD (LARS at large batch); an optimiser the user gives wins."""
    config, reasons = resolve_config(
        None, {"backbone": "timm/convnext_atto", "budget_s": 600}, MNIST, CPU
    )
    assert config.optimizer == "adamw" and config.weight_decay == 0.05
    assert config.batch_size == 32 and config.base_lr == pytest.approx(3e-4)
    assert config.final_lr == pytest.approx(3e-6)
    assert "no batch norm" in reasons["optimizer"]
    large, _ = resolve_config(
        None, {"backbone": "timm/vit_tiny_patch16_224", "batch_size": 1024}, PHOTOS, GPU, ranks=8
    )
    assert large.optimizer == "adamw"
    assert large.base_lr == pytest.approx(3e-4 * math.sqrt(1024 / 32), rel=1e-4)
    for with_bn in ("resnet18", "timm/efficientnet_b0", "torchvision/efficientnet_b0"):
        assert resolve_config(None, {"backbone": with_bn}, MNIST, CPU)[0].optimizer == "sgd"
    assert auto_recipe(MNIST, CPU, budget_s=600).config().optimizer == "sgd"
    given, _ = resolve_config(
        None, {"backbone": "timm/convnext_atto", "optimizer": "sgd"}, MNIST, CPU
    )
    assert given.optimizer == "sgd" and given.base_lr == pytest.approx(0.1)
