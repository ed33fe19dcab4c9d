"""Batched multi-crop: its draws have torchvision's and the paper's distributions, its
batched operations equal torchvision's per-crop kernels, and a sample's crops depend on
its seed alone.

Two-sample and one-sample Kolmogorov-Smirnov distances are compared with their critical
value at alpha = 0.001 (1.95 sqrt((n + m) / (n m)), Smirnov's asymptotic law); the seeds
are fixed, so a pass or a failure is the same on every run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from swav_core.batch_multicrop import (
    BatchMultiCrop,
    resized_crops_per_crop,
    resized_crops_roi_align,
)
from swav_core.crop_draws import CropParams
from swav_core.multicrop import (
    BLUR_SIGMA,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    blur_kernel_size,
)
from swav_core.presets import config_from

KS_ALPHA_0001 = 1.95


def ks_two_sample(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest gap between the two empirical CDFs, its critical value at alpha 0.001)."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    gap = (
        torch.searchsorted(a, grid, right=True) / len(a)
        - torch.searchsorted(b, grid, right=True) / len(b)
    ).abs()
    return float(gap.max()), KS_ALPHA_0001 * math.sqrt((len(a) + len(b)) / (len(a) * len(b)))


def ks_uniform(x: torch.Tensor, low: float, high: float) -> tuple[float, float]:
    """(KS distance of x to U(low, high), its critical value at alpha 0.001)."""
    x = x.double().sort().values
    n = len(x)
    cdf = ((x - low) / (high - low)).clamp(0, 1)
    upper = torch.arange(1, n + 1, dtype=torch.float64) / n
    gap = torch.maximum(upper - cdf, cdf - (upper - 1 / n))
    return float(gap.max()), KS_ALPHA_0001 / math.sqrt(n)


def paper() -> BatchMultiCrop:
    return BatchMultiCrop.from_config(config_from("imagenet-800ep"))


def paper_params(images: int, size: tuple[int, int] = (375, 500)) -> list[CropParams]:
    return paper().draw(list(range(images)), [size] * images)


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A smooth colour image with edges, (3, H, W) uint8."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.integers(0, 256, (1, 3, 6, 8), dtype=np.uint8)).float()
    smooth = torch.nn.functional.interpolate(coarse, (height, width), mode="bicubic")
    return smooth[0].clamp(0, 255).round().to(torch.uint8)


# ----------------------------------------------------------------- random resized crop


@pytest.mark.parametrize(
    ("height", "width", "scale"),
    [
        (375, 500, (0.14, 1.0)),  # the paper's large crops from an ImageNet-sized image
        (375, 500, (0.05, 0.14)),  # its small crops
        (60, 400, (0.9, 1.0)),  # no box fits in 10 attempts most times: the fallback
    ],
)
def test_crop_boxes_have_torchvisions_distribution(
    height: int, width: int, scale: tuple[float, float]
) -> None:
    draws = 3000
    transform = BatchMultiCrop((1,), (96,), (scale[0],), (scale[1],))
    params = transform.draw(list(range(draws)), [(height, width)] * draws)[0]
    ours = {
        "area": (params.height * params.width).double() / (height * width),
        "ratio": params.width.double() / params.height,
        "top": params.top.double() / (height - params.height + 1),
        "left": params.left.double() / (width - params.width + 1),
    }
    reference = v2.RandomResizedCrop(96, scale=scale)
    torch.manual_seed(0)
    boxes = [reference.make_params([torch.empty(3, height, width)]) for _ in range(draws)]
    h = torch.tensor([b["height"] for b in boxes], dtype=torch.float64)
    w = torch.tensor([b["width"] for b in boxes], dtype=torch.float64)
    theirs = {
        "area": h * w / (height * width),
        "ratio": w / h,
        "top": torch.tensor([b["top"] for b in boxes]) / (height - h + 1),
        "left": torch.tensor([b["left"] for b in boxes]) / (width - w + 1),
    }
    for name in ours:
        gap, critical = ks_two_sample(ours[name], theirs[name])
        assert gap < critical, f"{name}: KS distance {gap:.3f} >= {critical:.3f}"
    assert ((params.top >= 0) & (params.top + params.height <= height)).all()
    assert ((params.left >= 0) & (params.left + params.width <= width)).all()


# ----------------------------------------------------------- the paper's other draws


def test_flip_jitter_grayscale_blur_rates_follow_the_paper() -> None:
    params = paper_params(2000)  # 16000 crops
    crops = sum(len(p.flip) for p in params)
    for name, rate in (("flip", 0.5), ("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.5)):
        hits = sum(int(getattr(p, name).sum()) for p in params)
        # 5 binomial standard deviations: at most 0.02 for 16000 draws
        tolerance = 5 * math.sqrt(rate * (1 - rate) / crops)
        assert abs(hits / crops - rate) < tolerance, f"{name}: {hits / crops:.3f} vs {rate}"


def test_jitter_factors_and_blur_sigma_are_uniform_on_the_papers_ranges() -> None:
    params = paper_params(1000)
    factors = torch.cat([p.factors for p in params])  # (8000, 4)
    sigma = torch.cat([p.sigma for p in params])
    # ColorJitter(0.8, 0.8, 0.8, 0.2) at strength 1: [0.2, 1.8] three times, [-0.2, 0.2]
    ranges = [(0.2, 1.8), (0.2, 1.8), (0.2, 1.8), (-0.2, 0.2)]
    for column, (low, high) in enumerate(ranges):
        gap, critical = ks_uniform(factors[:, column], low, high)
        assert gap < critical, f"factor {column}: KS {gap:.3f}"
        assert factors[:, column].min() >= low and factors[:, column].max() <= high
    gap, critical = ks_uniform(sigma, *BLUR_SIGMA)
    assert gap < critical and sigma.min() >= 0.1 and sigma.max() <= 2.0


def test_jitter_order_is_a_uniform_permutation() -> None:
    order = torch.cat([p.order for p in paper_params(1500)])  # (12000, 4)
    assert (order.sort(dim=1).values == torch.arange(4)).all()
    codes = order @ torch.tensor([64, 16, 4, 1])
    counts = torch.unique(codes, return_counts=True)[1]
    assert len(counts) == 24
    expected = len(order) / 24  # 500; 5 binomial standard deviations is about 108
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected * (1 - 1 / 24))


def test_colour_jitter_strength_scales_the_ranges_and_zero_disables_it() -> None:
    half = BatchMultiCrop((2,), (32,), (0.5,), (1.0,), color_jitter_strength=0.5)
    factors = half.draw(list(range(500)), [(64, 64)] * 500)[0].factors
    assert factors[:, 0].min() >= 0.6 and factors[:, 0].max() <= 1.4
    assert factors[:, 3].abs().max() <= 0.1
    off = BatchMultiCrop((2,), (32,), (0.5,), (1.0,), color_jitter_strength=0.0)
    x = torch.rand(6, 3, 32, 32)
    params = off.draw(list(range(3)), [(64, 64)] * 3)[0]
    no_gray_blur_flip = CropParams(
        **{
            **params.__dict__,
            "grayscale": torch.zeros(6, dtype=torch.bool),
            "blur": torch.zeros(6, dtype=torch.bool),
            "flip": torch.zeros(6, dtype=torch.bool),
        }
    )
    torch.testing.assert_close(off.augment(x.clone(), no_gray_blur_flip, 32), x)


# ------------------------------------------- batched operations equal torchvision's kernels


def reference_augment(x: torch.Tensor, params: CropParams, size: int) -> torch.Tensor:
    """crop_transform's steps after the crop, one crop at a time with torchvision's kernels."""
    operations = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
    out = []
    for m, crop in enumerate(x):
        if params.flip[m]:
            crop = F.horizontal_flip(crop)
        if params.jitter[m]:
            for op in params.order[m].tolist():
                crop = operations[op](crop, float(params.factors[m, op]))
        if params.grayscale[m]:
            crop = F.rgb_to_grayscale(crop, num_output_channels=3)
        if params.blur[m]:
            k = blur_kernel_size(size)
            crop = F.gaussian_blur(crop, [k, k], [float(params.sigma[m])] * 2)
        out.append(crop)
    return torch.stack(out)


@pytest.mark.parametrize("size", [32, 13])
def test_flip_jitter_grayscale_blur_equal_torchvision_per_crop(size: int) -> None:
    transform = BatchMultiCrop((4,), (size,), (0.3,), (1.0,))
    params = transform.draw(list(range(40)), [(50, 60)] * 40)[0]  # 160 crops, every branch
    x = torch.rand(160, 3, size, size)
    x[:8] = x[:8, :1]  # grey crops: hue and saturation must leave them grey
    ours = transform.augment(x.clone(), params, size)
    torch.testing.assert_close(ours, reference_augment(x, params, size), rtol=0, atol=2e-5)


def test_resized_crops_are_antialiased_and_both_crop_paths_agree() -> None:
    """A 1-pixel checkerboard averages to grey when shrunk; aliasing would keep its contrast.
    On a smooth image the roi_align path (accelerators) stays within a few levels of the
    per-crop resize path (CPU), whose boxes are torchvision's F.resized_crop."""
    checker = ((torch.arange(400).view(-1, 1) + torch.arange(400)) % 2 * 255).to(torch.uint8)
    checker = checker.expand(3, -1, -1)
    transform = BatchMultiCrop((4,), (48,), (0.5,), (1.0,))
    params = transform.draw(list(range(4)), [(400, 400)] * 4)[0]
    for crops in (
        resized_crops_per_crop([checker] * 4, params, 48).float(),
        resized_crops_roi_align([checker] * 4, params, 48),
    ):
        assert (crops - 127.5).abs().max() < 20  # 255 / 2 +- a few levels at the borders

    smooth = [image(375, 500, seed) for seed in range(4)]
    params = transform.draw(list(range(4)), [(375, 500)] * 4)[0]
    per_crop = resized_crops_per_crop(smooth, params, 48).float()
    roi = resized_crops_roi_align(smooth, params, 48)
    for m in range(len(per_crop)):
        box = (int(params.top[m]), int(params.left[m]), int(params.height[m]), int(params.width[m]))
        expected = F.resized_crop(smooth[int(params.image[m])], *box, [48, 48])
        assert torch.equal(per_crop[m], expected.float())
    assert (per_crop - roi).abs().mean() < 1.5  # mean over pixels, in levels of 255


# ------------------------------------------------------------------- output and seeding


def test_output_shapes_dtype_and_normalised_range() -> None:
    images = [image(375, 500, 0), image(200, 300, 1), image(256, 256, 2)]
    crops = paper()(images, [5, 6, 7])
    assert [tuple(c.shape) for c in crops] == [(3, 3, 224, 224)] * 2 + [(3, 3, 96, 96)] * 6
    low = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    high = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    for crop in crops:
        assert crop.dtype == torch.float32 and torch.isfinite(crop).all()
        assert (crop >= low.view(3, 1, 1) - 1e-5).all() and (
            crop <= high.view(3, 1, 1) + 1e-5
        ).all()


def test_a_samples_crops_depend_on_its_seed_alone() -> None:
    """Same seed: same crops, whatever the batch around it, its position, its companions'
    sizes (the padding of the roi_align path) or the images' memory layout."""
    transform = paper()
    target = image(375, 500, 0)
    alone = transform([target], [42])
    again = transform([target], [42])
    among = transform([image(500, 500, 1), image(300, 400, 2), target], [1, 2, 42])
    hwc = transform([target.permute(1, 2, 0).contiguous().permute(2, 0, 1)], [42])
    drawn_alone = transform.draw([42], [(375, 500)])
    drawn_among = transform.draw([1, 2, 42], [(500, 500), (300, 400), (375, 500)])
    for one, many in zip(drawn_alone, drawn_among, strict=True):
        for field in CropParams.__dataclass_fields__:
            values = getattr(many, field)[many.image == 2]
            if field != "image":
                assert torch.equal(values, getattr(one, field)), field
    for k in range(len(alone)):
        assert torch.equal(alone[k][0], again[k][0])
        # the same draws; float sums vectorised over other neighbours round differently
        torch.testing.assert_close(among[k][2], alone[k][0], rtol=0, atol=1e-5)
        assert torch.equal(hwc[k][0], alone[k][0])
    other = transform([target], [43])
    assert not torch.equal(other[0][0], alone[0][0])

    params = BatchMultiCrop((2,), (64,), (0.2,), (1.0,)).draw([42], [(375, 500)])[0]
    crop_alone = resized_crops_roi_align([target], params, 64)
    params_among = BatchMultiCrop((2,), (64,), (0.2,), (1.0,)).draw(
        [1, 42], [(500, 600), (375, 500)]
    )[0]
    crop_among = resized_crops_roi_align([image(500, 600, 3), target], params_among, 64)
    torch.testing.assert_close(crop_among[params_among.image == 1], crop_alone, rtol=0, atol=1e-3)


def test_output_statistics_match_the_pil_path() -> None:
    """The two paths, crop for crop on the same image, give crops whose mean, spread and
    greyness have the same distributions (the PIL path works in uint8 between steps, a
    shift of under 1/255 that 400 draws cannot see)."""
    source = image(48, 64, 5)
    draws = 240
    pil = MultiCropTransform((1,), (24,), (0.14,), (1.0,))
    torch.manual_seed(0)
    pil_crops = torch.stack([pil(F.to_pil_image(source))[0] for _ in range(draws)])
    ours = BatchMultiCrop((1,), (24,), (0.14,), (1.0,))([source] * draws, list(range(draws)))[0]

    def statistics(crops: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            "mean": crops.mean(dim=(1, 2, 3)),
            "spread": crops.std(dim=(2, 3)).mean(dim=1),
            "colour": (crops[:, 0] - crops[:, 1]).abs().mean(dim=(1, 2)),
        }

    for name, ours_values in statistics(ours).items():
        gap, critical = ks_two_sample(ours_values, statistics(pil_crops)[name])
        assert gap < critical, f"{name}: KS distance {gap:.3f} >= {critical:.3f}"


def test_bad_input_is_refused_with_what_to_give() -> None:
    transform = paper()
    with pytest.raises(ValueError, match="one seed per image"):
        transform([image(64, 64)], [1, 2])
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        transform([torch.rand(3, 64, 64)], [1])
    with pytest.raises(ValueError, match=r"\(3, H, W\) uint8"):
        transform([torch.zeros(1, 64, 64, dtype=torch.uint8)], [1])
