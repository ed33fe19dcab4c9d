"""The multi-crop augmentation as batched tensor work, on the device that holds the images.

The same crops as `swav_core.multicrop.MultiCropTransform` (Caron et al., 2020, section 3.2
and appendix A): per crop a RandomResizedCrop of the group's scale range and aspect ratio
3/4-4/3, a horizontal flip (p=0.5), colour jitter (0.8s, 0.8s, 0.8s, 0.2s) in a random
order with p=0.8, grayscale with p=0.2, Gaussian blur (p=0.5, sigma in [0.1, 2] px) and
ImageNet normalisation. The draws have torchvision's distributions; what differs is the
work: each colour step runs once over many crops instead of once per crop, blur is
separable, and crops with the same jitter order are neighbours so each step runs in place.

Crop and resize: on the CPU, torchvision's uint8 antialiased resize per crop (its fast
path; an image stored channels-last, as a decoder gives it, is not copied); on an
accelerator, one `roi_align` per crop-size group over the images padded into one batch
(an area filter, so antialiased too; the padding never reaches a crop).

Input: a list of (3, H, W) uint8 tensors of any sizes (prepared datasets hold images at
their own size; shipping only real pixels keeps host-to-device copies small).

Randomness: every sample gets its own `torch.Generator`, seeded by the caller from
(seed, epoch, index) as `swav_core.data` does for the PIL path, and all of that sample's
draws come from it in a fixed order. A sample's draws therefore depend on its seed only,
not on the batch it is in, its position there or the rank; its pixels equal to float
rounding (sums vectorised over different neighbours).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from swav_core.config import TrainConfig
from swav_core.multicrop import BLUR_SIGMA, IMAGENET_MEAN, IMAGENET_STD, blur_kernel_size

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
CHUNK_BYTES = 2 << 20  # float crops worked on at once on the CPU: about an L2 cache


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


class BatchMultiCrop:
    """(list of N uint8 images, N seeds) -> list of crop batches, each (N, 3, size, size).

    The list holds n_crops[0] batches at size_crops[0], then the next group's, the layout
    of `swav_core.data.collate_crops` and the order in which `SwAVModel.forward` groups
    them. float32, ImageNet-normalised, on the images' device.
    """

    def __init__(
        self,
        n_crops: Sequence[int],
        size_crops: Sequence[int],
        min_scale_crops: Sequence[float],
        max_scale_crops: Sequence[float],
        color_jitter_strength: float = 1.0,
    ) -> None:
        self.groups = [
            (count, size, (low, high))
            for count, size, low, high in zip(
                n_crops, size_crops, min_scale_crops, max_scale_crops, strict=True
            )
        ]
        s = color_jitter_strength
        strengths = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        # ColorJitter's ranges: [max(0, 1 - x), 1 + x] for the first three, [-x, x] for hue;
        # an operation of strength 0 is left out, as ColorJitter leaves it out.
        self.factor_low = torch.tensor([max(0.0, 1 - x) for x in strengths[:3]] + [-strengths[3]])
        self.factor_high = torch.tensor([1 + x for x in strengths[:3]] + [strengths[3]])
        self.enabled = [x > 0 for x in strengths]

    @classmethod
    def from_config(cls, config: TrainConfig) -> BatchMultiCrop:
        return cls(
            config.n_crops,
            config.size_crops,
            config.min_scale_crops,
            config.max_scale_crops,
            config.color_jitter_strength,
        )

    @property
    def total_crops(self) -> int:
        return sum(count for count, _, _ in self.groups)

    def draw(self, seeds: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list[CropParams]:
        """The random parameters of every crop of every group, one CropParams per group.

        sizes: (H, W) of each image. Drawn on the CPU, in float64 as torchvision draws.
        """
        u = uniform_draws(seeds, self.total_crops)  # (N, total_crops, UNIFORMS_PER_CROP)
        n = len(seeds)
        heights = torch.tensor([hw[0] for hw in sizes], dtype=torch.long)
        widths = torch.tensor([hw[1] for hw in sizes], dtype=torch.long)
        params, first = [], 0
        for count, _, scale in self.groups:
            rows = u[:, first : first + count].transpose(0, 1).reshape(count * n, -1)  # (M, U)
            first += count
            top, left, h, w = resized_crop_boxes(
                rows, heights.repeat(count), widths.repeat(count), scale
            )
            low, high = self.factor_low.double(), self.factor_high.double()
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

    @torch.no_grad()
    def __call__(self, images: Sequence[torch.Tensor], seeds: Sequence[int]) -> list[torch.Tensor]:
        if len(images) != len(seeds) or not images:
            raise ValueError(
                f"got {len(images)} images and {len(seeds)} seeds: give one seed per image, "
                "and at least one image"
            )
        for i, image in enumerate(images):
            if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {i} is {image.dtype} of shape {tuple(image.shape)}: "
                    "give (3, H, W) uint8 RGB tensors"
                )
        device = images[0].device
        sizes = [(int(image.shape[1]), int(image.shape[2])) for image in images]
        scale = 1 / torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
        shift = -torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * scale
        crops: list[torch.Tensor] = []
        for (count, size, _), params in zip(self.groups, self.draw(seeds, sizes), strict=True):
            # Crops with the same jitter become neighbours, so that each operation runs
            # on a slice of them in place; `rows` maps back to the crop-major order.
            rows = torch.sort(params.jitter_key(), stable=True).indices
            params = params.select(rows)
            if device.type == "cpu":
                pixels = resized_crops_per_crop(images, params, size)
            else:
                pixels = resized_crops_roi_align(images, params, size)
            out = torch.empty(pixels.shape, dtype=torch.float32, device=device)
            # On the CPU each step runs over a few crops at a time, which stay in cache; on
            # an accelerator the whole group is one launch per step.
            step = len(out)
            if device.type == "cpu":
                step = max(1, CHUNK_BYTES // (4 * 3 * size * size))
            for first in range(0, len(out), step):
                chunk = slice(first, first + step)
                x = self.augment(pixels[chunk] * (1 / 255), params.select(chunk), size)
                x = torch.addcmul(shift, x, scale)  # (x - mean) / std
                out.index_copy_(0, rows[chunk].to(device), x)
            crops.extend(out.view(count, len(images), 3, size, size).unbind(0))
        return crops

    def augment(self, x: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
        """Flip, colour jitter (random order per crop), grayscale, then blur, as
        crop_transform; x (M, 3, size, size) in [0, 1], changed in place."""
        device = x.device
        flip = params.flip.nonzero().squeeze(1).to(device)
        if flip.numel():
            x[flip] = x[flip].flip(-1)
        factors = params.factors.to(device)
        keys, counts = torch.unique_consecutive(params.jitter_key(), return_counts=True)
        first = 0
        for key, count in zip(keys.tolist(), counts.tolist(), strict=True):
            run = slice(first, first + count)
            first += count
            if key == 255:  # no jitter
                continue
            for op in (key >> 6, (key >> 4) & 3, (key >> 2) & 3, key & 3):
                if self.enabled[op]:
                    _JITTER_OPS[op](x[run], factors[run, op])
        gray = params.grayscale.nonzero().squeeze(1).to(device)
        if gray.numel():
            x[gray] = F.rgb_to_grayscale(x[gray], num_output_channels=3)
        blur = params.blur.nonzero().squeeze(1).to(device)
        if blur.numel():
            x[blur] = gaussian_blur(x[blur], params.sigma.to(device)[blur], blur_kernel_size(size))
        return x


def resized_crops_per_crop(
    images: Sequence[torch.Tensor], params: CropParams, size: int
) -> torch.Tensor:
    """(M, 3, size, size) uint8: each box cut and resized by F.resized_crop, on the CPU.

    torchvision's antialiased bilinear resize of uint8 images (Pillow's filter, with its
    own vectorised CPU kernel) is several times faster there than one roi_align over the
    batch, which has no vectorised CPU kernel.
    """
    # The uint8 kernel reads pixels channels-last; an image stored so (a permuted (H, W, 3)
    # array, as decoders and prepared datasets give) is cut and resized without a copy.
    images = [
        image if image.permute(1, 2, 0).is_contiguous() else _channels_last(image)
        for image in images
    ]
    index = params.image.tolist()
    out = torch.empty(len(index), 3, size, size, dtype=torch.uint8)
    boxes = torch.stack([params.top, params.left, params.height, params.width], 1).tolist()
    for m, (top, left, height, width) in enumerate(boxes):
        out[m] = F.resized_crop(images[index[m]], top, left, height, width, [size, size])
    return out


def _channels_last(image: torch.Tensor) -> torch.Tensor:
    return image.permute(1, 2, 0).contiguous().permute(2, 0, 1)  # (3, H, W) over (H, W, 3)


def resized_crops_roi_align(
    images: Sequence[torch.Tensor], params: CropParams, size: int
) -> torch.Tensor:
    """(M, 3, size, size) float32, values 0..255: all boxes of a group in one roi_align.

    With aligned=True, box [left, left + width) maps onto exactly those pixels; with
    sampling_ratio=-1 every output pixel averages ceil(box/size)^2 bilinear samples per
    side, an area filter, so downscaling is antialiased. One launch per group, where
    a resize per crop would be thousands of launches per batch on an accelerator.
    """
    batch = _padded_batch(images)
    boxes = torch.stack(
        [
            params.image,
            params.left,
            params.top,
            params.left + params.width,
            params.top + params.height,
        ],
        dim=1,
    ).to(device=batch.device, dtype=batch.dtype)  # (M, 5): image, x1, y1, x2, y2
    return roi_align(batch, boxes, (size, size), 1.0, -1, True).clamp_(0, 255)


def _padded_batch(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(N, 3, max H, max W) float32 with values 0..255, on the images' device.

    Bilinear sampling inside a box reaches at most one pixel past the image's last row
    and column, which roi_align would read from the padding; that row and column repeat
    the edge, which is what roi_align does at a true border.
    """
    height = max(int(image.shape[1]) for image in images)
    width = max(int(image.shape[2]) for image in images)
    batch = torch.zeros(len(images), 3, height, width, device=images[0].device)
    for n, image in enumerate(images):
        h, w = int(image.shape[1]), int(image.shape[2])
        batch[n, :, :h, :w] = image
        if w < width:
            batch[n, :, :h, w] = batch[n, :, :h, w - 1]
        if h < height:
            batch[n, :, h, : min(w + 1, width)] = batch[n, :, h - 1, : min(w + 1, width)]
    return batch


def _per_crop(factor: torch.Tensor) -> torch.Tensor:
    return factor.view(-1, 1, 1, 1)


# ColorJitter's four operations on float crops x (M, 3, H, W) in [0, 1] with one factor
# per crop, in place; the formulas of torchvision's tensor kernels (blend with black, the
# mean gray level or the gray image, then clamp; a rotation of the HSV hue).


def _brightness(x: torch.Tensor, factor: torch.Tensor) -> None:
    x.mul_(_per_crop(factor)).clamp_(0, 1)


def _contrast(x: torch.Tensor, factor: torch.Tensor) -> None:
    f = _per_crop(factor)
    mean = F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)  # (M, 1, 1, 1)
    x.mul_(f).add_((1 - f) * mean).clamp_(0, 1)


def _saturation(x: torch.Tensor, factor: torch.Tensor) -> None:
    f = _per_crop(factor)
    gray = F.rgb_to_grayscale(x)  # (M, 1, H, W), of x before the blend
    x.mul_(f).add_((1 - f) * gray).clamp_(0, 1)


_HUE_PHASE = torch.tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # r, g, b in hsv_to_rgb below


def _hue(x: torch.Tensor, factor: torch.Tensor) -> None:
    """Hue moved by `factor` turns; value and saturation kept (torchvision's adjust_hue).

    Hue in sixths of a turn as Pillow's rgb->hsv computes it (red wins ties, then green);
    back to RGB with channel = V - C * clamp(min(k, 4 - k), 0, 1), k = (phase + 6 hue)
    mod 6, the closed form of the piecewise hsv->rgb. Written without comparisons or
    `where`, whose CPU kernels are several times slower than arithmetic.
    """
    r, g, b = x.unbind(1)  # (M, H, W) each
    value = torch.maximum(torch.maximum(r, g), b)
    chroma = value - torch.minimum(torch.minimum(r, g), b)
    red = 1 - torch.sign(value - r)  # 1 where red is the largest, else 0
    green = (1 - torch.sign(value - g)).mul_(1 - red)
    blue = 1 - red - green
    # 6 x hue x chroma, in [-chroma, 5 chroma)
    scaled = (g - b).mul_(red)
    scaled.addcmul_((b - r).add_(chroma, alpha=2), green)
    scaled.addcmul_((r - g).add_(chroma, alpha=4), blue)
    sixths = scaled.div_(chroma.clamp_min(1e-12))  # grey pixels: 0 / tiny = 0
    k = sixths.unsqueeze(1) + (_HUE_PHASE.to(x.device) + 6 * _per_crop(factor))  # (M, 3, H, W)
    k.sub_(torch.floor(k / 6), alpha=6)  # k mod 6
    ramp = torch.minimum(k, 4 - k).clamp_(0, 1)
    torch.addcmul(value.unsqueeze(1), chroma.unsqueeze(1), ramp, value=-1, out=x)


_JITTER_OPS = (_brightness, _contrast, _saturation, _hue)  # ColorJitter's operation ids


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Each crop of x (M, 3, H, W) blurred with its own sigma (M,), as F.gaussian_blur.

    The same sampled, normalised kernel and reflect padding as torchvision; applied
    separably, one shifted multiply-add per tap and direction with each crop's weight,
    which equals its 2-D outer-product kernel and, with per-crop weights, runs faster on
    the CPU than a depthwise convolution with one group per crop and channel.
    """
    m, c, h, w = x.shape
    half = (kernel_size - 1) / 2
    taps = torch.linspace(-half, half, kernel_size, device=x.device)
    kernel = torch.exp(-0.5 * (taps / sigma.view(-1, 1)) ** 2)  # (M, k)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).view(m, 1, 1, 1, kernel_size)
    r = kernel_size // 2
    padded = torch.nn.functional.pad(x, (r, r, r, r), mode="reflect")  # (M, 3, H+2r, W+2r)
    rows = padded[..., 0:w] * kernel[..., 0]  # (M, 3, H+2r, W)
    for t in range(1, kernel_size):
        rows.addcmul_(padded[..., t : t + w], kernel[..., t])
    out = rows[..., 0:h, :] * kernel[..., 0]  # (M, 3, H, W)
    for t in range(1, kernel_size):
        out.addcmul_(rows[..., t : t + h, :], kernel[..., t])
    return out
