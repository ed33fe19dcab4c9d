"""A small labelled image set with visible structure, generated on the spot.

For the demo, the tests and the benchmarks: four shape classes (disk, square, stripes,
cross) drawn at random positions and sizes in random colours on random backgrounds, so
colour is a nuisance and shape is the signal. Written as PNG files under one folder per
class.

Random colours are a hard case for short runs: both crops of an image share its colours,
so colour alone predicts the swapped codes and a few CPU-minutes of SwAV learn colour,
not shape (measured: kNN and linear probe no better than random weights). With
`palette="mono"` (light shapes on dark grounds, brightness varying, like MNIST) shape is
the only cue, and the same budget does beat random weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "stripes", "cross")


Palette = Literal["random", "mono"]


def shape_image(
    shape: str, size: int, rng: np.random.Generator, palette: Palette = "random"
) -> Image.Image:
    """One `size` x `size` RGB image of `shape` at a random position and scale, in random
    colours or (mono) a light grey on a dark grey."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    radius = rng.uniform(0.22, 0.38) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    if shape == "disk":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
    elif shape == "square":
        mask = (abs(yy - cy) < radius * 0.85) & (abs(xx - cx) < radius * 0.85)
    elif shape == "stripes":
        period = rng.uniform(0.18, 0.3) * size
        mask = np.sin(2 * np.pi * yy / period + rng.uniform(0, 2 * np.pi)) > 0
    elif shape == "cross":
        arm = radius * 0.3
        inside = (abs(yy - cy) < radius) & (abs(xx - cx) < radius)
        mask = inside & ((abs(yy - cy) < arm) | (abs(xx - cx) < arm))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")
    if palette == "mono":
        background = np.full(3, rng.uniform(0, 90))
        foreground = np.full(3, rng.uniform(165, 255))
    else:
        background, foreground = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        while np.abs(background - foreground).sum() < 150:
            foreground = rng.uniform(0, 255, 3)
    pixels = np.where(mask[..., None], foreground, background)
    pixels += rng.normal(0, 8, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_shapes_dataset(
    root: Path,
    per_class: int = 32,
    size: int = 40,
    seed: int = 0,
    with_classes: bool = True,
    palette: Palette = "random",
) -> Path:
    """Write per_class PNGs of each shape under root/<shape>/ (or flat) and return root."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    for shape in SHAPES:
        folder = root / shape if with_classes else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape_image(shape, size, rng, palette).save(folder / f"{shape}_{i:04d}.png")
    return root
