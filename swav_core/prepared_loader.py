"""The training input from a prepared dataset: uint8 images and seeds, cropped in batches.

The PIL path (`swav_core.data.make_loader`) decodes every image and makes its crops one by
one in DataLoader workers. Here a worker only reads image i from the memory-mapped
prepared copy (swav_core/prepared.py) and the crops of a whole batch are made by
`BatchMultiCrop`: on the training device when it is an accelerator (only real pixels
cross to it), in the workers when training runs on the CPU (so that they still overlap
with the step), in the training process when there are no workers.

The sampler is the PIL path's `ShardedEpochSampler`, so DDP sharding and exact mid-epoch
resume are unchanged, and sample (epoch, i) is seeded with `mix_seed(seed, epoch, i)`,
the seed that `MultiCropDataset` gives it: its crops depend on that key alone.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from swav_core.batch_multicrop import BatchMultiCrop
from swav_core.config import TrainConfig
from swav_core.data import MultiCropDataset, SampleKey, ShardedEpochSampler, make_loader, mix_seed
from swav_core.image_folder import ImageFolderScan
from swav_core.multicrop import MultiCropTransform
from swav_core.prepared import PreparedImages, PreparedIncomplete

PreparedSample = tuple[torch.Tensor, int, int]  # (3, H, W) uint8, seed, index
CropBatch = tuple[list[torch.Tensor], torch.Tensor]  # crop batches, indices: make_loader's


class PreparedBatch(NamedTuple):
    """A batch before its crops: images of their own sizes, one seed each, their indices."""

    images: list[torch.Tensor]
    seeds: list[int]
    indices: torch.Tensor


class PreparedDataset(Dataset[PreparedSample]):
    """`dataset[(epoch, index)]` -> (image `index` as (3, H, W) uint8, its seed, index).

    The image is a private copy laid out channels-last (the layout BatchMultiCrop's CPU
    resize reads without copying), not a view of the read-only memory map.
    """

    def __init__(self, images: PreparedImages, seed: int) -> None:
        self.images = images
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: SampleKey) -> PreparedSample:
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(
                f"PreparedDataset takes (epoch, index) keys, got {key!r}; "
                "draw them from ShardedEpochSampler"
            )
        epoch, index = int(key[0]), int(key[1])
        pixels = np.ascontiguousarray(self.images[index].transpose(1, 2, 0))  # (H, W, 3)
        image = torch.from_numpy(pixels).permute(2, 0, 1)
        return image, mix_seed(self.seed, epoch, index), index


def collate_prepared(batch: Sequence[PreparedSample]) -> PreparedBatch:
    """Samples -> one PreparedBatch; the images stay a list, as their sizes differ."""
    return PreparedBatch(
        images=[sample[0] for sample in batch],
        seeds=[sample[1] for sample in batch],
        indices=torch.tensor([sample[2] for sample in batch], dtype=torch.long),
    )


def batch_crops(
    batch: PreparedBatch, multicrop: BatchMultiCrop, device: torch.device
) -> list[torch.Tensor]:
    """The batch's crops on `device`, in collate_crops' layout (crop k of every sample)."""
    images = [image.to(device, non_blocking=True) for image in batch.images]
    return multicrop(images, batch.seeds)


class _CropInWorker:
    """A collate_fn that also makes the crops, on the CPU of the worker that runs it."""

    def __init__(self, multicrop: BatchMultiCrop) -> None:
        self.multicrop = multicrop

    def __call__(self, batch: Sequence[PreparedSample]) -> CropBatch:
        prepared = collate_prepared(batch)
        return batch_crops(prepared, self.multicrop, torch.device("cpu")), prepared.indices


class PreparedLoader:
    """Iterates (list of crop batches, index batch) as `make_loader`'s DataLoader does.

    Re-iterating starts the sampler's current epoch again (`sampler.set_epoch` between
    epochs takes effect); workers persist across epochs.
    """

    def __init__(
        self,
        dataset: PreparedDataset,
        sampler: ShardedEpochSampler,
        multicrop: BatchMultiCrop,
        batch_size_per_rank: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        self.multicrop = multicrop
        self.device = device
        self.crops_in_workers = device.type == "cpu" and num_workers > 0
        self.loader: DataLoader[PreparedSample] = DataLoader(
            dataset,
            batch_size=batch_size_per_rank,
            sampler=sampler,
            num_workers=num_workers,
            collate_fn=_CropInWorker(multicrop) if self.crops_in_workers else collate_prepared,
            pin_memory=device.type == "cuda",
            drop_last=True,
            persistent_workers=num_workers > 0,
            prefetch_factor=2 if num_workers > 0 else None,
            generator=torch.Generator().manual_seed(0),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[CropBatch]:
        for batch in self.loader:
            if isinstance(batch, PreparedBatch):
                yield batch_crops(batch, self.multicrop, self.device), batch.indices
            else:
                yield batch


def open_prepared(
    prepared_dir: Path, config: TrainConfig, fingerprint: str, num_images: int
) -> tuple[PreparedImages | None, str]:
    """The prepared copy to train from, or None and why it cannot serve this run.

    It must be complete, of the same scan as the images folder (same fingerprint and
    count, so that index i is the same image), and keep every image's shorter side up to
    at least the largest crop (a smaller cap would crop from smaller pixels than PIL does).
    """
    try:
        images = PreparedImages(prepared_dir)
    except PreparedIncomplete as exc:
        return None, f"the prepared copy is incomplete ({exc})"
    manifest = images.manifest
    if manifest.fingerprint != fingerprint or manifest.num_images != num_images:
        return None, "the prepared copy is of other images than the dataset's folder"
    largest = max(config.size_crops)
    if manifest.max_short_side < largest:
        return None, (
            f"the prepared copy caps images at {manifest.max_short_side} px, below the "
            f"largest crop of {largest} px"
        )
    return images, "prepared"


@dataclass(frozen=True)
class TrainingInput:
    """The batches a run iterates, which path makes them, and why not the prepared one."""

    loader: Iterable[CropBatch]
    data_path: Literal["pil", "prepared"]
    prepared_refused: str | None  # set when a prepared copy was given but cannot serve


def training_input(
    config: TrainConfig,
    scan: ImageFolderScan,
    fingerprint: str,
    sampler: ShardedEpochSampler,
    device: torch.device,
    prepared_dir: Path | None,
) -> TrainingInput:
    """The prepared path when `prepared_dir` can serve the run (open_prepared), else PIL."""
    per_rank = sampler.batch_size_per_rank
    refused = None
    if prepared_dir is not None:
        images, reason = open_prepared(prepared_dir, config, fingerprint, len(scan.files))
        if images is not None:
            loader = PreparedLoader(
                PreparedDataset(images, config.seed),
                sampler,
                BatchMultiCrop.from_config(config),
                per_rank,
                config.num_workers,
                device,
            )
            return TrainingInput(loader, "prepared", None)
        refused = reason
    dataset = MultiCropDataset(scan, MultiCropTransform.from_config(config), config.seed)
    return TrainingInput(
        make_loader(dataset, sampler, per_rank, config.num_workers, device), "pil", refused
    )
