"""Image embeddings from a SwAV model: backbone features or projected features."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from swav_core.images import load_rgb
from swav_core.model import SwAVModel
from swav_core.multicrop import eval_transform, to_rgb_image

Layer = Literal["backbone", "projection"]

# Model-sized pixels per batch when embedding files: 318 images at 224 px, 15 at 1024 px,
# so that a large input size does not make a count-sized batch of gigabytes.
BATCH_PIXELS = 16_000_000


def images_per_batch(size: int) -> int:
    """How many `size` x `size` images make one batch of at most BATCH_PIXELS (at least 1)."""
    return max(1, BATCH_PIXELS // (size * size))


def preprocess(images: Sequence[Any], size: int) -> torch.Tensor:
    """PIL images (any mode) to a normalised (N x 3 x size x size) float batch."""
    transform = eval_transform(size)
    return torch.stack([transform(to_rgb_image(image)) for image in images])


@torch.no_grad()
def embed(
    model: SwAVModel,
    images: torch.Tensor | Sequence[Any],
    layer: Layer = "backbone",
    normalize: bool = True,
    batch_size: int = 256,
    size: int = 224,
) -> torch.Tensor:
    """(N x D) float32 embeddings of `images`, in eval mode, `batch_size` at a time.

    `images` is a preprocessed (N x 3 x H x W) tensor or a sequence of PIL images,
    which are resized and centre-cropped to `size`. layer="backbone" gives the pooled
    backbone features (D = F, what linear probes use); "projection" gives the head's
    output z before its L2 normalisation. `normalize` L2-normalises the rows.
    """
    if layer not in ("backbone", "projection"):
        raise ValueError(f"layer must be 'backbone' or 'projection', got {layer!r}")
    batch = images if isinstance(images, torch.Tensor) else preprocess(images, size)
    parameter = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        outputs = []
        for chunk in batch.split(batch_size):
            chunk = chunk.to(parameter.device, parameter.dtype)
            if parameter.is_contiguous(memory_format=torch.channels_last):
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            features = model.backbone(chunk)
            if layer == "projection":
                features = model.projection(features)
            outputs.append(features.float())
        if not outputs:
            raise ValueError("no images to embed")
        result = torch.cat(outputs)
    finally:
        model.train(was_training)
    return F.normalize(result, dim=1) if normalize else result


def embed_files(
    model: SwAVModel,
    paths: Sequence[Path],
    layer: Layer = "backbone",
    normalize: bool = True,
    size: int = 224,
    batch_size: int | None = None,
) -> torch.Tensor:
    """`embed` of the images at `paths`, in order, without holding them decoded together.

    Each file is decoded (`load_rgb`) and at once reduced to its model-sized rows, so memory
    holds one decoded image and one batch of rows: `batch_size` images, by default
    `images_per_batch(size)`. Same values as `embed` on the decoded list.
    """
    if not paths:
        raise ValueError("no images to embed")
    per_batch = batch_size or images_per_batch(size)
    transform = eval_transform(size)
    outputs = []
    for start in range(0, len(paths), per_batch):
        batch = torch.stack([transform(load_rgb(p)) for p in paths[start : start + per_batch]])
        outputs.append(embed(model, batch, layer, normalize, batch_size=per_batch, size=size))
    return torch.cat(outputs)
