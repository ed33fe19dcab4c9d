"""The multi-crop augmentation: crop counts, sizes, dtype, value range, image modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from swav_core.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    eval_transform,
    to_rgb_image,
)
from swav_core.presets import config_from

LOW = torch.tensor([(0 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
HIGH = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])


def rgb_image(width: int = 48, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def within_normalised_range(crop: torch.Tensor, tol: float = 1e-5) -> bool:
    low = LOW.view(3, 1, 1) - tol
    high = HIGH.view(3, 1, 1) + tol
    return bool(((crop >= low) & (crop <= high)).all())


def transform_2_3() -> MultiCropTransform:
    return MultiCropTransform((2, 3), (32, 16), (0.3, 0.1), (1.0, 0.3))


def test_crop_count_and_sizes_follow_config() -> None:
    torch.manual_seed(0)
    out = transform_2_3()(rgb_image())
    assert len(out) == 5
    assert [tuple(c.shape) for c in out] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3


def test_from_config_preset() -> None:
    config = config_from("cpu-tiny")
    out = MultiCropTransform.from_config(config)(rgb_image())
    assert len(out) == config.total_crops
    expected = [
        s for n, s in zip(config.n_crops, config.size_crops, strict=True) for _ in range(n)
    ]
    assert [c.shape[-1] for c in out] == expected
    assert [c.shape[-2] for c in out] == expected


def test_float32_and_normalised_range() -> None:
    torch.manual_seed(1)
    transform = transform_2_3()
    for seed in range(8):  # several draws of the random augmentations
        for crop in transform(rgb_image(seed=seed)):
            assert crop.dtype == torch.float32
            assert torch.isfinite(crop).all()
            assert within_normalised_range(crop)
    # extreme images reach the ends of the range: all black / all white, no jitter effect
    black = Image.new("RGB", (40, 40), (0, 0, 0))
    white = Image.new("RGB", (40, 40), (255, 255, 255))
    out_black = eval_transform(16)(black)
    out_white = eval_transform(16)(white)
    torch.testing.assert_close(out_black, LOW.view(3, 1, 1).expand(3, 16, 16))
    torch.testing.assert_close(out_white, HIGH.view(3, 1, 1).expand(3, 16, 16))


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_other_pil_modes_give_three_channels(mode: str) -> None:
    image = rgb_image()
    image = image.convert("I;16") if mode == "I;16" else image.convert(mode)
    assert image.mode == mode
    torch.manual_seed(2)
    out = transform_2_3()(image)
    assert len(out) == 5
    for crop in out:
        assert crop.shape[0] == 3
        assert crop.dtype == torch.float32
        assert torch.isfinite(crop).all()
    assert to_rgb_image(image).mode == "RGB"


def test_grayscale_input_gives_equal_channels_before_jitter() -> None:
    gray = rgb_image().convert("L")
    out = eval_transform(16)(to_rgb_image(gray))
    assert out.shape == (3, 16, 16)
    # equal pixel values in all channels, so the normalised channels are affine in each other
    unnormalised = out * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(
        IMAGENET_MEAN
    ).view(3, 1, 1)
    torch.testing.assert_close(unnormalised[0], unnormalised[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(unnormalised[0], unnormalised[2], rtol=0, atol=1e-5)


def test_one_channel_tensor_becomes_rgb() -> None:
    tensor = torch.rand(1, 20, 20)
    assert to_rgb_image(tensor).shape == (3, 20, 20)


# ---------------------------------------------------------------- the paper's distributions
# Values from the paper (appendix A) and facebookresearch/swav's scripts, written here
# rather than read from swav_core: crops of 14-100% of the image at 224 px and of 5-14%
# at 96 px, aspect ratio 3/4-4/3; blur with p = 0.5 and sigma uniform in [0.1, 2] px.
PAPER_SCALES = {224: (0.14, 1.0), 96: (0.05, 0.14)}
PAPER_SIGMA = (0.1, 2.0)


def components(transform: MultiCropTransform, kind: type) -> list:
    found = []
    for crop in transform.transforms:
        for step in crop.transforms:
            inner = step.transforms if isinstance(step, v2.RandomApply) else [step]
            found.extend((crop, t, step) for t in inner if isinstance(t, kind))
    return found


def test_crop_areas_and_aspect_ratios_follow_the_paper() -> None:
    transform = MultiCropTransform.from_config(config_from("imagenet-800ep"))
    image = [torch.zeros(3, 400, 400)]
    crops = components(transform, v2.RandomResizedCrop)
    assert [tuple(c.size) for _, c, _ in crops] == [(224, 224)] * 2 + [(96, 96)] * 6
    torch.manual_seed(0)
    for _, crop, _ in crops[:2] + crops[2:3]:
        low, high = PAPER_SCALES[crop.size[0]]
        params = [crop.make_params(image) for _ in range(2000)]
        areas = torch.tensor([p["height"] * p["width"] / 400**2 for p in params])
        ratios = torch.tensor([p["width"] / p["height"] for p in params])
        # integer sides round the area by at most 2/400 of each side
        assert areas.min() >= low - 0.01 and areas.max() <= high + 0.01
        margin = 0.05 * (high - low)  # 2000 uniform draws come this close to both ends
        assert areas.min() <= low + margin and areas.max() >= high - margin
        assert ratios.min() >= 0.75 - 0.02 and ratios.max() <= 4 / 3 + 0.02


def test_blur_sigma_follows_the_paper_without_truncation() -> None:
    """The measured spread of a blurred impulse is the sigma drawn; at the top of the range
    it reaches 2 px (a kernel cut at +-2 sigma, 9 taps at 96 px, would stop near 1.76)."""
    transform = MultiCropTransform.from_config(config_from("imagenet-800ep"))
    blurs = components(transform, v2.GaussianBlur)
    assert len(blurs) == 8
    assert all(apply.p == 0.5 for _, _, apply in blurs)
    impulse = torch.zeros(1, 96, 96)
    impulse[0, 48, 48] = 1.0
    offsets = (torch.arange(96) - 48.0) ** 2
    torch.manual_seed(0)
    _, blur, _ = blurs[-1]  # a 96 px crop's blur
    sigmas = []
    for _ in range(400):
        out = blur(impulse)[0]
        sigmas.append(float((out.sum(dim=0) * offsets).sum() / out.sum()) ** 0.5)
    measured = torch.tensor(sigmas)
    # Above ~0.6 px the sampled kernel's spread is its sigma (below, the taps at +-1 px
    # vanish and it reads lower), so the upper quantiles of U(0.1, 2) show directly:
    # median 1.05, 90th percentile 1.81; 400 draws put them within ~0.1.
    assert measured.max() <= PAPER_SIGMA[1] + 0.01 and measured.max() >= 1.95
    assert abs(float(measured.quantile(0.5)) - 1.05) < 0.1
    assert abs(float(measured.quantile(0.9)) - 1.81) < 0.08
    assert measured.min() <= 0.3
