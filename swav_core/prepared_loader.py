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
from swav_core.device_prefetch import DevicePrefetch
from swav_core.errors import DataError
from swav_core.image_folder import ImageFolderScan, scan_image_folder
from swav_core.multicrop import MultiCropTransform
from swav_core.prepared import (
    PreparedImages,
    PreparedIncomplete,
    ShardFetch,
    refusal_for_crops,
)

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
        if self.device.type == "cuda":  # crops made ahead, while the GPU runs the step
            yield from DevicePrefetch(self.loader, self._crops, self.device)
            return
        for batch in self.loader:
            if isinstance(batch, PreparedBatch):
                yield self._crops(batch)
            else:
                yield batch

    def _crops(self, batch: PreparedBatch) -> CropBatch:
        return batch_crops(batch, self.multicrop, self.device), batch.indices


@dataclass(frozen=True)
class TrainingImages:
    """The scan a run trains on, the prepared copy that serves it (if one does) and, when
    a copy was given but cannot serve, why not."""

    scan: ImageFolderScan
    prepared: PreparedImages | None
    refused: str | None


def training_images(
    config: TrainConfig,
    data_dir: Path,
    prepared_dir: Path | None = None,
    fetch: ShardFetch | None = None,
) -> TrainingImages:
    """What a run reads: the images folder, its prepared copy, or the copy alone.

    A copy serves when it is complete (shards that `fetch` brings may be missing) and keeps
    every image's shorter side up to at least the largest crop (a smaller cap would crop
    from fewer pixels than PIL does). With the images folder here, it is scanned and the
    copy must be of the same scan (same fingerprint: index i is the same image). Without
    it (a worker streaming the copy from the artifact store), the copy's recorded scan is
    used; a copy that cannot serve is then a DataError naming why.
    """
    images, refused = None, None
    if prepared_dir is not None:
        try:
            images = PreparedImages(prepared_dir, fetch)
            refused = refusal_for_crops(images.manifest, config.size_crops)
        except PreparedIncomplete as exc:
            refused = f"the prepared copy is incomplete ({exc})"
        if refused is not None:
            images = None
    if not Path(data_dir).is_dir():
        if images is not None:
            return TrainingImages(images.scan(), images, None)
        if refused is not None:
            raise DataError(f"the dataset's images are not here and {refused}")
    scan = scan_image_folder(data_dir)
    if images is not None and images.manifest.fingerprint != scan.fingerprint():
        images, refused = None, "the prepared copy is of other images than the dataset's folder"
    return TrainingImages(scan, images, refused)


@dataclass(frozen=True)
class TrainingInput:
    """The batches a run iterates and which path makes them."""

    loader: Iterable[CropBatch]
    data_path: Literal["pil", "prepared"]


def training_input(
    config: TrainConfig,
    source: TrainingImages,
    sampler: ShardedEpochSampler,
    device: torch.device,
) -> TrainingInput:
    """Batches from the prepared copy when one serves the run, else decoded with PIL."""
    per_rank = sampler.batch_size_per_rank
    if source.prepared is not None:
        loader = PreparedLoader(
            PreparedDataset(source.prepared, config.seed),
            sampler,
            BatchMultiCrop.from_config(config),
            per_rank,
            config.num_workers,
            device,
        )
        return TrainingInput(loader, "prepared")
    dataset = MultiCropDataset(source.scan, MultiCropTransform.from_config(config), config.seed)
    return TrainingInput(
        make_loader(dataset, sampler, per_rank, config.num_workers, device), "pil"
    )
