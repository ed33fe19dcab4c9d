"""Which crop sides a backbone can take, found on the meta device (no compute, no memory).

A CNN that downsamples 32x has nothing left of a crop much under 32 px (ConvNeXt refuses
it), a ViT's patch embedding needs a side divisible by its patch, and torchvision's ViT
takes one size only. The API refuses such a config at submit (`crop_size_problem`), and
the auto recipe raises its crop sides to ones the given backbone takes
(`fitted_crop_sizes`), so a user naming a backbone never gets a job that cannot start.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from swav_core.backbone_families import crop_output
from swav_core.errors import ConfigError
from swav_core.model import create_backbone

SEARCH_SPAN = 64  # look for a usable side up to this many px above the wanted one


@lru_cache(maxsize=64)
def meta_backbone(backbone: str, input_size: int) -> nn.Module | str:
    """The backbone built on the meta device for `input_size`, or why it cannot be (also
    what the auto recipe reads its layers from)."""
    try:
        with torch.device("meta"):
            return create_backbone(backbone, input_size)
    except ConfigError as exc:
        return str(exc)


@lru_cache(maxsize=1024)
def crop_refusal(backbone: str, size: int, input_size: int) -> str | None:
    """Why `backbone` built for `input_size` px cannot take `size` px crops, or None."""
    model = meta_backbone(backbone, input_size)
    if isinstance(model, str):
        return model
    try:
        with torch.device("meta"):
            crop_output(model, backbone, size)
    except ConfigError as exc:
        return str(exc)
    return None


def crop_size_problem(backbone: str, sizes: tuple[int, ...]) -> str | None:
    """The first crop side of `sizes` (largest first) that `backbone` cannot take, explained."""
    for size in sizes:
        refusal = crop_refusal(backbone, size, sizes[0])
        if refusal is not None:
            return refusal
    return None


def _smallest_side(backbone: str, at_least: int, input_size: int | None = None) -> int:
    """The smallest side >= `at_least` that `backbone` takes (built for `input_size`, or for
    that side itself), searched up to SEARCH_SPAN px above `at_least`."""
    last = at_least + SEARCH_SPAN
    for side in range(at_least, last + 1):
        if crop_refusal(backbone, side, input_size or side) is None:
            return side
    raise ConfigError(
        f"backbone {backbone} takes no crop side from {at_least} to {last} px: "
        f"{crop_refusal(backbone, at_least, input_size or at_least)}"
    )


def fitted_crop_sizes(backbone: str, sizes: tuple[int, ...]) -> tuple[int, ...]:
    """`sizes` (largest first, distinct) made sides `backbone` takes: each raised to the
    nearest side it takes (ConvNeXt's 32 px at least, a multiple of a ViT's patch), and a
    larger side raised again where it would not stay above the next. Unchanged when the
    backbone takes them all."""
    if crop_size_problem(backbone, sizes) is None:
        return tuple(sizes)
    largest = _smallest_side(backbone, sizes[0])
    fitted = [_smallest_side(backbone, s, largest) for s in sizes[1:]]
    for i in range(len(fitted) - 2, -1, -1):
        if fitted[i] <= fitted[i + 1]:
            fitted[i] = _smallest_side(backbone, fitted[i + 1] + 1, largest)
    if fitted and largest <= fitted[0]:
        largest = _smallest_side(backbone, fitted[0] + 1)
    return (largest, *fitted)
