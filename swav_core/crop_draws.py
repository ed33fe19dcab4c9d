"""The random draws of the batched multi-crop (swav_core/batch_multicrop.py), per crop.

Every crop takes a fixed row of uniforms from its sample's own generator, seeded by the
caller from (seed, epoch, index): its box (RandomResizedCrop's ten attempts and central
fallback), flip, jitter (whether, factors and order), grayscale, blur and sigma, with
torchvision's distributions (Caron et al., 2020, appendix A). A sample's draws depend on
its seed only, not on its batch, its position there or the rank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch

from swav_core.multicrop import BLUR_SIGMA, CropGroup

ASPECT_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default, used by the paper
ATTEMPTS = 10  # RandomResizedCrop.make_params tries this many boxes before its fallback
FLIP_P, JITTER_P, GRAYSCALE_P, BLUR_P = 0.5, 0.8, 0.2, 0.5

# Columns of a crop's row of uniform draws, fixed so that a seed always means the same crops.
_AREA = slice(0, ATTEMPTS)
_RATIO = slice(ATTEMPTS, 2 * ATTEMPTS)
_TOP, _LEFT, _FLIP, _JITTER = 20, 21, 22, 23
_FACTORS = slice(24, 28)  # brightness, contrast, saturation, hue
_ORDER = slice(28, 32)  # argsort of 4 uniforms: a uniform permutation, as torch.randperm(4)
_GRAY, _BLUR, _SIGMA = 32, 33, 34
UNIFORMS_PER_CROP = 35


@dataclass(frozen=True)
class CropParams:
    """Everything random about M = count x N crops of one group, crop-major (row k*N + n is
    crop k of image n). Integer boxes are in the image's pixels, as torchvision's crop."""

    image: torch.Tensor  # (M,) int64: the image of the batch the crop is cut from
    top: torch.Tensor  # (M,) int64
    left: torch.Tensor  # (M,)
    height: torch.Tensor  # (M,)
    width: torch.Tensor  # (M,)
    flip: torch.Tensor  # (M,) bool
    jitter: torch.Tensor  # (M,) bool
    factors: torch.Tensor  # (M, 4) float32: brightness, contrast, saturation, hue
    order: torch.Tensor  # (M, 4) int64: order[m, slot] is the operation run at that slot
    grayscale: torch.Tensor  # (M,) bool
    blur: torch.Tensor  # (M,) bool
    sigma: torch.Tensor  # (M,) float32

    def select(self, rows: slice | torch.Tensor) -> CropParams:
        """The parameters of crops `rows` only, in that order."""
        return CropParams(**{f.name: getattr(self, f.name)[rows] for f in fields(self)})

    def jitter_key(self) -> torch.Tensor:
        """(M,) equal for crops whose jitter runs the same operations in the same order."""
        code = self.order @ torch.tensor([64, 16, 4, 1])
        return torch.where(self.jitter, code, 255)


def resized_crop_boxes(
    u: torch.Tensor, heights: torch.Tensor, widths: torch.Tensor, scale: tuple[float, float]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, height, width) as torchvision's RandomResizedCrop.make_params draws them.

    u: (M, UNIFORMS_PER_CROP) uniforms; heights, widths: (M,) image sides. Up to ten boxes of
    area `scale` x the image's and log-uniform aspect ratio, the first that fits is kept;
    if none fits, the central crop with the ratio clamped into range. randint(0, n) is
    floor(u * n), the same uniform law over integers.
    """
    H, W = heights.double().unsqueeze(1), widths.double().unsqueeze(1)  # (M, 1)
    target = H * W * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA])  # (M, ATTEMPTS)
    log_low, log_high = math.log(ASPECT_RATIO[0]), math.log(ASPECT_RATIO[1])
    ratio = torch.exp(log_low + (log_high - log_low) * u[:, _RATIO])
    # torch.round rounds half to even, as Python's round in make_params
    w = torch.round(torch.sqrt(target * ratio))
    h = torch.round(torch.sqrt(target / ratio))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # first fitting attempt
    found = fits.any(dim=1)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    H, W = H.squeeze(1), W.squeeze(1)

    in_ratio = W / H
    narrow, wide = in_ratio < ASPECT_RATIO[0], in_ratio > ASPECT_RATIO[1]
    fallback_w = torch.where(narrow, W, torch.where(wide, torch.round(H * ASPECT_RATIO[1]), W))
    fallback_h = torch.where(narrow, torch.round(W / ASPECT_RATIO[0]), H)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    top = torch.where(
        found, torch.floor(u[:, _TOP] * (H - h + 1)), torch.div(H - h, 2, rounding_mode="floor")
    )
    left = torch.where(
        found, torch.floor(u[:, _LEFT] * (W - w + 1)), torch.div(W - w, 2, rounding_mode="floor")
    )
    return top.long(), left.long(), h.long(), w.long()


def uniform_draws(seeds: Sequence[int], total_crops: int) -> torch.Tensor:
    """(N, total_crops, UNIFORMS_PER_CROP) float64 uniforms, row n from seed n alone (CPU)."""
    rows = [
        torch.rand(
            total_crops,
            UNIFORMS_PER_CROP,
            generator=torch.Generator().manual_seed(int(seed)),
            dtype=torch.float64,
        )
        for seed in seeds
    ]
    return torch.stack(rows)


def draw_crop_params(
    groups: Sequence[CropGroup],
    jitter_low: torch.Tensor,
    jitter_high: torch.Tensor,
    seeds: Sequence[int],
    sizes: Sequence[tuple[int, int]],
) -> list[CropParams]:
    """The random parameters of every crop of every group, one CropParams per group.

    sizes: (H, W) of each image; jitter factors are drawn uniformly in [jitter_low,
    jitter_high] (brightness, contrast, saturation, hue). Drawn on the CPU, in float64 as
    torchvision draws.
    """
    total = sum(group.count for group in groups)
    u = uniform_draws(seeds, total)  # (N, total, UNIFORMS_PER_CROP)
    n = len(seeds)
    heights = torch.tensor([hw[0] for hw in sizes], dtype=torch.long)
    widths = torch.tensor([hw[1] for hw in sizes], dtype=torch.long)
    params, first = [], 0
    for group in groups:
        count, scale = group.count, group.scale
        rows = u[:, first : first + count].transpose(0, 1).reshape(count * n, -1)  # (M, U)
        first += count
        top, left, h, w = resized_crop_boxes(
            rows, heights.repeat(count), widths.repeat(count), scale
        )
        low, high = jitter_low.double(), jitter_high.double()
        params.append(
            CropParams(
                image=torch.arange(count * n) % n,
                top=top,
                left=left,
                height=h,
                width=w,
                flip=rows[:, _FLIP] < FLIP_P,
                jitter=rows[:, _JITTER] < JITTER_P,
                factors=(low + (high - low) * rows[:, _FACTORS]).float(),
                order=rows[:, _ORDER].argsort(dim=1),
                grayscale=rows[:, _GRAY] < GRAYSCALE_P,
                blur=rows[:, _BLUR] < BLUR_P,
                sigma=(
                    BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * rows[:, _SIGMA]
                ).float(),
            )
        )
    return params
