"""The SwAV network: backbone, projection head, prototypes, grouped multi-resolution forward.

A backbone registry in the style of timm: `create_backbone(name, input_size)` returns a
module that maps images (B x 3 x H x W) to pooled features (B x F) and raises on an
unknown name, listing the known ones. The prototypes are a bias-free Linear (K x D)
whose rows are re-normalised to unit length after every update (paper section 3.1: C has
unit columns).

Besides any timm or torchvision model by `<family>/<name>` (swav_core/backbone_families.py),
two ResNet families of our own: torchvision's ImageNet ResNets (a 7x7 stride-2 stem and a max-pool,
4x down before the first stage: right for 160-224 px crops, wasteful below), and small
ResNets for small images and CPU budgets (`small_resnet{10,18}_w{16,32,64}`): a 3x3 stem
whose stride brings the largest crop to at most 32 px, no max-pool, basic blocks of
width w, 2w, 4w, 8w, as the CIFAR variants of SimCLR and solo-learn but with a width
and a stem that follow the budget and the image size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import groupby

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from swav_core.backbone_families import feature_width, timm_backbone, torchvision_backbone
from swav_core.backbone_names import (
    SMALL_RESNETS,
    TORCHVISION_RESNETS,
    backbone_name_problem,
    split_family,
)
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


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut (He et al., 2016)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


def small_stem_stride(input_size: int) -> int:
    """The power-of-two stride that brings `input_size` to at most 32 px (1 up to 32 px)."""
    stride = 1
    while input_size / stride > 32:
        stride *= 2
    return stride


class SmallResNet(nn.Module):
    """A ResNet for small inputs: 3x3 stem (stride from the input size), 4 stages of basic
    blocks (widths w, 2w, 4w, 8w; strides 1, 2, 2, 2), global average pooling."""

    def __init__(self, width: int, blocks: Sequence[int], input_size: int) -> None:
        super().__init__()
        stride = small_stem_stride(input_size)
        layers: list[nn.Module] = [
            nn.Conv2d(3, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        cin = width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for i in range(count):
                layers.append(BasicBlock(cin, cout, 2 if i == 0 and stage > 0 else 1))
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = cin
        for module in self.modules():  # torchvision's ResNet initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)


def _torchvision_resnet(name: str) -> Callable[[int], nn.Module]:
    def build(input_size: int) -> nn.Module:
        model = getattr(torchvision.models, name)(weights=None)
        model.num_features = model.fc.in_features
        model.fc = nn.Identity()
        return model

    return build


def _small_resnet(width: int, blocks: tuple[int, ...]) -> Callable[[int], nn.Module]:
    return lambda input_size: SmallResNet(width, blocks, input_size)


_BACKBONES: dict[str, Callable[[int], nn.Module]] = {
    "tiny_cnn": lambda input_size: TinyCNN(),
    **{name: _torchvision_resnet(name) for name in TORCHVISION_RESNETS},
    **{name: _small_resnet(*shape) for name, shape in SMALL_RESNETS.items()},
}


_FAMILIES: dict[str, Callable[[str, int], nn.Module]] = {
    "timm": timm_backbone,
    "torchvision": torchvision_backbone,
}


def backbone_names() -> list[str]:
    """Our own backbone names (timm's and torchvision's are `timm/<name>`, ...)."""
    return sorted(_BACKBONES)


def create_backbone(name: str, input_size: int = 224) -> nn.Module:
    """A randomly initialised backbone with `.num_features`, mapping B x 3 x H x W to B x F.

    `input_size` is the largest crop's side: the small ResNets size their stem by it, and
    timm's vision transformers their position-embedding grid. A `timm/` or `torchvision/`
    backbone's F is read from a forward pass at `input_size` (swav_core/backbone_families.py).
    """
    problem = backbone_name_problem(name)
    if problem is not None:
        raise KeyError(problem)
    family, model_name = split_family(name)
    if family is None:
        return _BACKBONES[name](input_size)
    backbone = _FAMILIES[family](model_name, input_size)
    setattr(backbone, "num_features", feature_width(backbone, name, input_size))  # noqa: B010
    return backbone


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

    def __init__(
        self,
        backbone: str,
        hidden_mlp: int,
        feat_dim: int,
        n_prototypes: int,
        input_size: int = 224,
    ) -> None:
        super().__init__()
        self.backbone_name = backbone
        self.backbone = create_backbone(backbone, input_size)
        self.projection = projection_head(self.num_features, hidden_mlp, feat_dim)
        self.prototypes = nn.Linear(feat_dim, n_prototypes, bias=False)
        self.normalize_prototypes()

    @classmethod
    def from_config(cls, config: TrainConfig) -> SwAVModel:
        return cls(
            config.backbone,
            config.hidden_mlp,
            config.feat_dim,
            config.n_prototypes,
            config.size_crops[0],
        )

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
        z and the scores are fp32 even under a bf16/fp16 autocast.
        """
        features = []
        start = 0
        for count in resolution_groups(crops):
            batch = torch.cat(list(crops[start : start + count]))  # (count*B, 3, H, W)
            if next(self.backbone.parameters()).is_contiguous(memory_format=torch.channels_last):
                batch = batch.contiguous(memory_format=torch.channels_last)
            features.append(self.backbone(batch))
            start += count
        # The head and the prototypes run in fp32 whatever the autocast: z feeds Sinkhorn
        # (scores / eps with eps ~0.05 magnify rounding: bf16 scores make codes ~8x less
        # precise than fp16) and the queue, and this part costs little next to the backbone.
        with torch.autocast(device_type=features[0].device.type, enabled=False):
            pooled = torch.cat(features)  # (N, F)
            z = self.project(pooled.to(torch.promote_types(pooled.dtype, torch.float32)))
            # z: (N, D)
            return z, self.prototypes(z)
