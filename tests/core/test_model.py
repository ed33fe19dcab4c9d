"""`SwAVModel`: grouped multi-resolution forward, backbone registry, head and prototypes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from swav_core.model import (
    SwAVModel,
    backbone_names,
    create_backbone,
    projection_head,
    resolution_groups,
)
from swav_core.presets import config_from
from tests.core.conftest import assert_unknown_name_lists_known

EXPECTED_FEATURES = {
    "tiny_cnn": 64,
    "resnet18": 512,
    "resnet34": 512,
    "resnet50": 2048,
    "resnet101": 2048,
    "wide_resnet50_2": 2048,
    "wide_resnet101_2": 2048,
    # Stages of w, 2w, 4w, 8w channels: 8w features.
    **{f"small_resnet{d}_w{w}": 8 * w for d in (10, 18) for w in (16, 32, 64)},
}


def crops(batch: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """2 x 32 px + 2 x 16 px crops of `batch` images."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 32, 32, generator=gen) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=gen) for _ in range(2)
    ]


@pytest.mark.parametrize(
    "model_args", [("tiny_cnn", 32, 16, 10), ("resnet18", 64, 16, 10)], ids=lambda a: a[0]
)
def test_grouped_forward_equals_per_crop_forward_in_eval(model_args: tuple) -> None:
    torch.manual_seed(0)
    model = SwAVModel(*model_args).eval()
    inputs = crops()
    with torch.no_grad():
        z, scores = model(inputs)
        per_crop = [model([crop]) for crop in inputs]
    assert z.shape == (12, 16)
    assert scores.shape == (12, 10)
    torch.testing.assert_close(z, torch.cat([p[0] for p in per_crop]), rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, torch.cat([p[1] for p in per_crop]), rtol=0, atol=1e-5)


def test_channels_last_model_gives_same_output() -> None:
    torch.manual_seed(1)
    model = SwAVModel("tiny_cnn", 32, 16, 10).eval()
    inputs = crops()
    with torch.no_grad():
        z, scores = model(inputs)
        model = model.to(memory_format=torch.channels_last)
        z_cl, scores_cl = model(inputs)
    torch.testing.assert_close(z_cl, z, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores_cl, scores, rtol=0, atol=1e-5)


def test_resolution_groups() -> None:
    assert resolution_groups(crops()) == [2, 2]
    a, b = torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 4, 4)
    assert resolution_groups([a, b, a]) == [1, 1, 1]
    assert resolution_groups([a]) == [1]


@pytest.mark.parametrize("name", backbone_names())
def test_every_registered_backbone_runs_at_two_resolutions(name: str) -> None:
    torch.manual_seed(2)
    model = SwAVModel(name, 16, 8, 5)
    assert model.num_features == EXPECTED_FEATURES[name]
    inputs = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    model.train()
    z, scores = model(inputs)  # train mode: batch norm on 2 images per resolution
    assert z.shape == (4, 8)
    assert scores.shape == (4, 5)
    assert torch.isfinite(scores).all()
    scores.sum().backward()
    assert model.prototypes.weight.grad is not None
    model.eval()
    with torch.no_grad():
        z_eval, _ = model(inputs)
    torch.testing.assert_close(z_eval.norm(dim=1), torch.ones(4), rtol=0, atol=1e-5)


def test_backbone_names_cover_the_registry() -> None:
    assert set(backbone_names()) == set(EXPECTED_FEATURES)
    assert backbone_names() == sorted(backbone_names())


def test_unknown_backbone_lists_known_names() -> None:
    assert_unknown_name_lists_known(create_backbone, backbone_names())


def test_prototypes_unit_rows_after_normalize() -> None:
    torch.manual_seed(3)
    model = SwAVModel("tiny_cnn", 32, 16, 10)
    norms = model.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10), rtol=0, atol=1e-6)  # after __init__
    with torch.no_grad():
        model.prototypes.weight.mul_(torch.rand(10, 1) * 50 + 0.01)
        model.prototypes.weight.add_(torch.randn(10, 16))
    model.normalize_prototypes()
    norms = model.prototypes.weight.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10), rtol=0, atol=1e-6)
    assert model.prototypes.bias is None


def test_hidden_mlp_zero_gives_single_linear() -> None:
    head = projection_head(64, 0, 16)
    assert isinstance(head, nn.Linear)
    assert (head.in_features, head.out_features) == (64, 16)
    model = SwAVModel("tiny_cnn", 0, 16, 10)
    assert isinstance(model.projection, nn.Linear)
    mlp = projection_head(64, 32, 16)
    assert isinstance(mlp, nn.Sequential)
    assert [type(m) for m in mlp] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]


@pytest.mark.parametrize("hidden_mlp", [0, 32])
def test_z_is_unit_norm(hidden_mlp: int) -> None:
    torch.manual_seed(4)
    model = SwAVModel("tiny_cnn", hidden_mlp, 16, 10)
    z, scores = model(crops())
    torch.testing.assert_close(z.norm(dim=1), torch.ones(12), rtol=0, atol=1e-5)
    assert (scores.abs() <= 1 + 1e-5).all()  # unit z against unit prototypes: cosines
    torch.testing.assert_close(scores, z @ model.prototypes.weight.t())


def test_from_config() -> None:
    config = config_from("cpu-tiny")
    model = SwAVModel.from_config(config)
    assert model.num_features == 64
    assert model.prototypes.weight.shape == (config.n_prototypes, config.feat_dim)


def test_grouped_forward_calls_the_backbone_once_per_resolution_in_train_mode() -> None:
    """2 x 32 px + 4 x 16 px crops: two backbone calls, on batches of 2n and 4n, so batch
    norm sees each resolution's crops together (the paper's multi-resolution forward)."""
    torch.manual_seed(0)
    model = SwAVModel("tiny_cnn", 32, 16, 10).train()
    n = 3
    inputs = [torch.randn(n, 3, 32, 32) for _ in range(2)] + [
        torch.randn(n, 3, 16, 16) for _ in range(4)
    ]
    calls: list[tuple[int, ...]] = []
    model.backbone.register_forward_hook(lambda _m, args, _out: calls.append(tuple(args[0].shape)))
    z, scores = model(inputs)
    assert calls == [(2 * n, 3, 32, 32), (4 * n, 3, 16, 16)]
    assert z.shape == (6 * n, 16) and scores.shape == (6 * n, 10)


def test_head_and_scores_stay_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    model = SwAVModel("tiny_cnn", 32, 16, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, scores = model(crops())
    assert z.dtype == torch.float32 and scores.dtype == torch.float32
    # fp32 z: unit norm to fp32 precision (bf16 rows would be off by ~1e-3)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(12), rtol=0, atol=1e-6)


def test_every_listed_backbone_is_built_and_nothing_else() -> None:
    """The API checks names against swav_core/backbone_names.py without importing torch."""
    from swav_core.backbone_names import BACKBONES
    from swav_core.model import backbone_names

    assert backbone_names() == list(BACKBONES)
