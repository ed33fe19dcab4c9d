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

Randomness (swav_core/crop_draws.py): every sample gets its own generator, seeded by the
caller from (seed, epoch, index) as `swav_core.data` does for the PIL path, so a sample's
crops depend on its seed only; its pixels equal to float rounding (sums vectorised over
different neighbours).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torchvision.ops import roi_align
from torchvision.transforms.v2 import functional as F

from swav_core.crop_draws import CropParams, draw_crop_params
from swav_core.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropSpec,
    blur_kernel_size,
)

CHUNK_BYTES = 2 << 20  # float crops worked on at once on the CPU: about an L2 cache


class BatchMultiCrop(MultiCropSpec):
    """(list of N uint8 images, N seeds) -> list of crop batches, each (N, 3, size, size).

    The list holds n_crops[0] batches at size_crops[0], then the next group's, the layout
    of `swav_core.data.collate_crops` and the order in which `SwAVModel.forward` groups
    them. float32, ImageNet-normalised, on the images' device.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        s = self.color_jitter_strength
        strengths = (0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)
        # ColorJitter's ranges: [max(0, 1 - x), 1 + x] for the first three, [-x, x] for hue;
        # an operation of strength 0 is left out, as ColorJitter leaves it out.
        self.factor_low = torch.tensor([max(0.0, 1 - x) for x in strengths[:3]] + [-strengths[3]])
        self.factor_high = torch.tensor([1 + x for x in strengths[:3]] + [strengths[3]])
        self.enabled = [x > 0 for x in strengths]

    def draw(self, seeds: Sequence[int], sizes: Sequence[tuple[int, int]]) -> list[CropParams]:
        """The random parameters of every crop of every group (swav_core/crop_draws.py)."""
        return draw_crop_params(self.groups, self.factor_low, self.factor_high, seeds, sizes)

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
        for group, params in zip(self.groups, self.draw(seeds, sizes), strict=True):
            count, size = group.count, group.size
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
                if device.type == "cpu":  # CPU index_copy_ runs far below memory speed
                    for crop, row in zip(x, rows[chunk].tolist(), strict=True):
                        torch.addcmul(shift[0], crop, scale[0], out=out[row])
                else:
                    out.index_copy_(0, rows[chunk].to(device), torch.addcmul(shift, x, scale))
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
