"""The multi-crop augmentation: crop counts, sizes, dtype, value range, image modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from swav_core.config import config_from
from swav_core.multicrop import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropTransform,
    blur_kernel_size,
    eval_transform,
    to_rgb_image,
)

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
        s for n, s in zip(config.nmb_crops, config.size_crops, strict=True) for _ in range(n)
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


@pytest.mark.parametrize("size", [*range(1, 64), 96, 160, 224, 256, 512])
def test_blur_kernel_size_odd(size: int) -> None:
    kernel = blur_kernel_size(size)
    assert kernel % 2 == 1
    assert kernel >= 3
    assert abs(kernel - 0.1 * size) <= 3  # about 10% of the crop side


def test_blur_kernel_paper_values() -> None:
    assert blur_kernel_size(224) == 23
    assert blur_kernel_size(96) == 9
