"""The multi-crop augmentation (Caron et al., 2020, section 3.2 and appendix A).

Each group of crops has a resolution and a RandomResizedCrop scale range; every crop
then gets a horizontal flip, colour distortion (jitter 0.8s, 0.8s, 0.8s, 0.2s with
p=0.8, grayscale with p=0.2), Gaussian blur (p=0.5, sigma in [0.1, 2]) and ImageNet
normalisation. Crops come back grouped by resolution, largest first, the order in which
`SwAVModel.forward` batches them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Self

import torch
from PIL import Image
from torchvision.transforms import v2

from swav_core.config import TrainConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


BLUR_SIGMA = (0.1, 2.0)  # pixels of the crop; facebookresearch/swav radius_min, radius_max


def blur_kernel_size(crop_size: int, max_sigma: float = BLUR_SIGMA[1]) -> int:
    """An odd kernel reaching 3 sigma on each side for the largest sigma, capped by the crop.

    The official code blurs with PIL's GaussianBlur(radius=sigma), which does not truncate
    near 2 sigma as a kernel of 10% of the crop does (9 taps at 96 px for sigma 2);
    +-3 sigma keeps 99.7% of the mass. Reflect padding needs the radius below the side.
    """
    radius = min(math.ceil(3 * max_sigma), max(1, (crop_size - 1) // 2))
    return 2 * radius + 1


def to_rgb_image(image: Any) -> Any:
    """PIL images in any mode (L, P, RGBA, CMYK...) and 1-channel tensors become RGB."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 1:
        return image.expand(3, -1, -1)
    return image


def crop_transform(
    size: int, min_scale: float, max_scale: float, color_jitter_strength: float = 1.0
) -> v2.Compose:
    """One crop of the paper's augmentation: a normalised float tensor (3 x size x size)."""
    s = color_jitter_strength
    # The geometric and colour operations run on the PIL image (Pillow's C code is ~15%
    # faster than the tensor kernels for one small image); conversion comes last.
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(min_scale, max_scale), antialias=True),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(blur_kernel_size(size), sigma=BLUR_SIGMA)], p=0.5),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(size: int) -> v2.Compose:
    """Deterministic preprocessing for embedding and evaluation: resize, centre crop, normalise."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


@dataclass(frozen=True)
class CropGroup:
    """`count` crops of `size` px, each a RandomResizedCrop of `scale` of the image's area."""

    count: int
    size: int
    scale: tuple[float, float]


class MultiCropSpec:
    """What a multi-crop makes: its crop groups, largest first, and the jitter strength.

    The one constructor and `from_config` of both implementations: this module's PIL one
    and swav_core.batch_multicrop's batched tensor one.
    """

    def __init__(
        self,
        n_crops: Sequence[int],
        size_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        color_jitter_strength: float = 1.0,
    ) -> None:
        self.groups = tuple(
            CropGroup(count, size, (low, high))
            for count, size, low, high in zip(
                n_crops, size_crops, min_scale_crops, max_scale_crops, strict=True
            )
        )
        self.color_jitter_strength = color_jitter_strength

    @classmethod
    def from_config(cls, config: TrainConfig) -> Self:
        return cls(
            config.n_crops,
            config.size_crops,
            config.min_scale_crops,
            config.max_scale_crops,
            config.color_jitter_strength,
        )

    @property
    def total_crops(self) -> int:
        return sum(group.count for group in self.groups)


class MultiCropTransform(MultiCropSpec):
    """image -> list of crops: n_crops[0] at size_crops[0], then the next group, ..."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.transforms = [
            crop_transform(group.size, *group.scale, self.color_jitter_strength)
            for group in self.groups
            for _ in range(group.count)
        ]

    def __call__(self, image: Any) -> list[torch.Tensor]:
        image = to_rgb_image(image)
        return [transform(image) for transform in self.transforms]
