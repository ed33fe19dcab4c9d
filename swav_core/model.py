"""The SwAV network: backbone, projection head, prototypes, grouped multi-resolution forward.

A backbone registry in the style of timm: `create_backbone(name)` returns a module that
maps images (B x 3 x H x W) to pooled features (B x F) and raises on an unknown name,
listing the known ones. The prototypes are a bias-free Linear (K x D) whose rows are
re-normalised to unit length every step (paper section 3.1: C has unit columns).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from swav_core.config import TrainConfig


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU stages and global pooling: a 64-d backbone that trains in seconds."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()

        def stage(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        self.features = nn.Sequential(
            *stage(3, width, 1), *stage(width, 2 * width, 2), *stage(2 * width, 4 * width, 2)
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = 4 * width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _torchvision_resnet(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        model = getattr(torchvision.models, name)(weights=None)
        model.num_features = model.fc.in_features
        model.fc = nn.Identity()
        return model

    return build


_BACKBONES: dict[str, Callable[[], nn.Module]] = {
    "tiny_cnn": TinyCNN,
    **{
        name: _torchvision_resnet(name)
        for name in (
            "resnet18",
            "resnet34",
            "resnet50",
            "resnet101",
            "wide_resnet50_2",
            "wide_resnet101_2",
        )
    },
}


def backbone_names() -> list[str]:
    return sorted(_BACKBONES)


def create_backbone(name: str) -> nn.Module:
    """A randomly initialised backbone with `.num_features`, mapping B x 3 x H x W to B x F."""
    if name not in _BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; known backbones: {', '.join(backbone_names())}")
    return _BACKBONES[name]()


def projection_head(in_features: int, hidden_mlp: int, feat_dim: int) -> nn.Module:
    """Linear-BN-ReLU-Linear as in the paper's code; hidden_mlp=0 gives a single Linear."""
    if hidden_mlp == 0:
        return nn.Linear(in_features, feat_dim)
    return nn.Sequential(
        nn.Linear(in_features, hidden_mlp),
        nn.BatchNorm1d(hidden_mlp),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_mlp, feat_dim),
    )


def resolution_groups(crops: Sequence[torch.Tensor]) -> list[int]:
    """Lengths of the runs of consecutive crops with the same spatial size."""
    return [len(list(run)) for _, run in groupby(crops, key=lambda c: tuple(c.shape[-2:]))]


class SwAVModel(nn.Module):
    """Backbone + projection head + prototypes; `forward(crops)` gives (z, scores)."""

    def __init__(self, backbone: str, hidden_mlp: int, feat_dim: int, n_prototypes: int) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone)
        self.projection = projection_head(self.num_features, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, n_prototypes, bias=False)
        self.normalize_prototypes()

    @classmethod
    def from_config(cls, config: TrainConfig) -> SwAVModel:
        return cls(config.backbone, config.hidden_mlp, config.feat_dim, config.n_prototypes)

    @property
    def num_features(self) -> int:
        return int(getattr(self.backbone, "num_features"))  # noqa: B009 (set by create_backbone)

    @torch.no_grad()
    def normalize_prototypes(self) -> None:
        """Project the prototype rows back onto the unit sphere (done before every step)."""
        self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1, p=2))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised z (B x D) from backbone features (B x F)."""
        return F.normalize(self.projection(features), dim=1, p=2)

    def forward(self, crops: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """z (N x D) and scores z^T C (N x K) for all crops, N = sum of their batch sizes.

        One backbone pass per run of same-resolution crops (they are concatenated), then
        one head pass over every crop: batch norm in the head sees all crops together.
        """
        features = []
        start = 0
        for count in resolution_groups(crops):
            batch = torch.cat(list(crops[start : start + count]))  # (count*B, 3, H, W)
            if next(self.backbone.parameters()).is_contiguous(memory_format=torch.channels_last):
                batch = batch.contiguous(memory_format=torch.channels_last)
            features.append(self.backbone(batch))
            start += count
        z = self.project(torch.cat(features))  # (N, D)
        return z, self.prototypes(z)
