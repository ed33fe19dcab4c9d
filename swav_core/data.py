"""The training input: a keyed multi-crop dataset, a sharded sampler, and their DataLoader.

The images are those of a checked scan (swav_core.image_folder). Resume is bit-exact
because nothing random depends on process state: the sampler's permutation is a function
of (seed, epoch) and a sample's augmentation a function of (seed, epoch, index). The
sampler therefore yields keys `(epoch, index)` rather than plain indices, and the dataset
seeds the global torch RNG (which torchvision v2 transforms draw from) from that key,
whatever worker process runs it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from swav_core.errors import DataError
from swav_core.image_folder import ImageFolderScan
from swav_core.images import load_rgb

SampleKey = tuple[int, int]
Sample = tuple[list[torch.Tensor], int]


def mix_seed(*values: int) -> int:
    """A 63-bit seed that changes unpredictably with every one of `values`."""
    text = ":".join(str(int(v)) for v in values).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


class MultiCropDataset(Dataset[Sample]):
    """`dataset[(epoch, index)]` -> (crops of image `index`, index), same crops for the same key.

    The transform runs under a forked global torch RNG seeded from (seed, epoch, index),
    so the crops do not depend on the worker, the number of workers or what ran before.
    """

    def __init__(
        self,
        scan: ImageFolderScan,
        transform: Callable[[Image.Image], list[torch.Tensor]],
        seed: int,
    ) -> None:
        self.scan = scan
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.scan.files)

    def __getitem__(self, key: SampleKey) -> Sample:
        if not isinstance(key, tuple) or len(key) != 2:
            raise TypeError(
                f"MultiCropDataset takes (epoch, index) keys, got {key!r}; "
                "draw them from ShardedEpochSampler"
            )
        epoch, index = int(key[0]), int(key[1])
        name = self.scan.files[index]
        try:
            image = load_rgb(self.scan.root / name)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(
                f"{name} in {self.scan.root} cannot be read any more ({exc}); "
                "the folder changed after it was scanned"
            ) from exc
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(mix_seed(self.seed, epoch, index))
            crops = self.transform(image)
        return crops, index


class ShardedEpochSampler(Sampler[SampleKey]):
    """One epoch of `(epoch, index)` keys for one rank, in full batches only.

    Every rank draws the same permutation from (seed, epoch). Global batch i is
    `perm[i*G : (i+1)*G]` with G = batch_size_per_rank * world_size, and rank r takes
    its r-th contiguous slice of b = batch_size_per_rank, so concatenating the ranks'
    batch i in rank order gives exactly the batch i of a single process with batch G.
    The tail that does not fill a global batch is dropped. `set_epoch` selects the
    epoch and the batch to start from (to resume mid-epoch).
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size_per_rank: int,
        rank: int,
        world_size: int,
        seed: int,
        start_epoch: int = 0,
        start_batch: int = 0,
    ) -> None:
        if batch_size_per_rank < 1 or world_size < 1:
            raise ValueError(
                f"batch_size_per_rank={batch_size_per_rank} and world_size={world_size} "
                "must both be >= 1"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} is outside 0..{world_size - 1}")
        self.dataset_len = dataset_len
        self.batch_size_per_rank = batch_size_per_rank
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        global_batch = batch_size_per_rank * world_size
        if dataset_len // global_batch == 0:
            raise DataError(
                f"the dataset has {dataset_len} images, fewer than the global batch of "
                f"{global_batch} ({world_size} ranks x {batch_size_per_rank}); "
                "lower batch_size or add images"
            )
        self.epoch = 0
        self.start_batch = 0
        self.set_epoch(start_epoch, start_batch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size_per_rank * self.world_size

    @property
    def batches_per_epoch(self) -> int:
        return self.dataset_len // self.global_batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Iterate epoch `epoch` next, from its batch `start_batch` (0..batches_per_epoch)."""
        if epoch < 0:
            raise ValueError(f"epoch={epoch} must be >= 0")
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(
                f"start_batch={start_batch} is outside 0..{self.batches_per_epoch} "
                f"(batches per epoch)"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def permutation(self, epoch: int) -> torch.Tensor:
        """The epoch's order of all dataset indices; identical on every rank."""
        generator = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
        return torch.randperm(self.dataset_len, generator=generator)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, b = self.epoch, self.batch_size_per_rank
        order = self.permutation(epoch).tolist()
        for batch in range(self.start_batch, self.batches_per_epoch):
            first = batch * self.global_batch_size + self.rank * b
            for index in order[first : first + b]:
                yield epoch, index

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size_per_rank


def collate_crops(batch: list[Sample]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """[(crops, index), ...] -> ([crop 0 of all samples stacked, crop 1 ..., ...], indices)."""
    n_crops = len(batch[0][0])
    crops = [torch.stack([sample[0][c] for sample in batch]) for c in range(n_crops)]
    indices = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    return crops, indices


def make_loader(
    dataset: MultiCropDataset,
    sampler: ShardedEpochSampler,
    batch_size_per_rank: int,
    num_workers: int,
    device: torch.device,
) -> DataLoader[Sample]:
    """A DataLoader of (list of V crop batches, index batch) over the sampler's current epoch.

    Workers persist across epochs; the sampler is re-iterated in the main process on
    every `iter(loader)`, so `sampler.set_epoch` between epochs takes effect. The loader
    has its own generator so iterating it leaves the global torch RNG untouched.
    """
    return DataLoader(
        dataset,
        batch_size=batch_size_per_rank,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_crops,
        pin_memory=device.type == "cuda",
        drop_last=True,
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )
