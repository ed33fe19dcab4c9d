"""The keyed multi-crop dataset, the sharded sampler and the loader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from swav_core.data import MultiCropDataset, ShardedEpochSampler, make_loader
from swav_core.errors import DataError
from swav_core.image_folder import scan_image_folder
from swav_core.multicrop import MultiCropTransform


def tiny_transform() -> MultiCropTransform:
    return MultiCropTransform((1, 2), (16, 8), (0.3, 0.1), (1.0, 0.3))


def test_dataset_crops_are_a_function_of_seed_epoch_index(class_dir: Path) -> None:
    scan = scan_image_folder(class_dir)
    dataset = MultiCropDataset(scan, tiny_transform(), seed=5)
    assert len(dataset) == len(scan.files)
    torch.manual_seed(0)
    crops, index = dataset[(3, 4)]
    assert index == 4
    assert [tuple(c.shape) for c in crops] == [(3, 16, 16), (3, 8, 8), (3, 8, 8)]
    global_state = torch.get_rng_state()
    torch.manual_seed(123)  # the global RNG state does not matter ...
    again, _ = dataset[(3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(crops, again, strict=True))
    torch.manual_seed(0)  # ... and is left untouched
    dataset[(3, 4)]
    assert torch.equal(torch.get_rng_state(), global_state)

    other_epoch, _ = dataset[(4, 4)]
    assert not torch.equal(crops[0], other_epoch[0])
    other_seed, _ = MultiCropDataset(scan, tiny_transform(), seed=6)[(3, 4)]
    assert not torch.equal(crops[0], other_seed[0])
    with pytest.raises(TypeError, match="epoch, index"):
        dataset[4]  # type: ignore[index]


def test_loader_batches_identical_with_0_or_2_workers(class_dir: Path) -> None:
    scan = scan_image_folder(class_dir)
    dataset = MultiCropDataset(scan, tiny_transform(), seed=1)
    cpu = torch.device("cpu")

    def run(workers: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        sampler = ShardedEpochSampler(len(dataset), 4, 0, 1, seed=2)
        loader = make_loader(dataset, sampler, 4, workers, cpu)
        batches: list[tuple[list[torch.Tensor], torch.Tensor]] = []
        for epoch in (0, 1):  # persistent workers re-iterate the sampler each epoch
            sampler.set_epoch(epoch)
            batches.extend(loader)
        return batches

    serial, parallel = run(0), run(2)
    assert len(serial) == 2 * (13 // 4)
    for (crops_a, idx_a), (crops_b, idx_b) in zip(serial, parallel, strict=True):
        assert torch.equal(idx_a, idx_b)
        assert [tuple(c.shape) for c in crops_a] == [(4, 3, 16, 16), (4, 3, 8, 8), (4, 3, 8, 8)]
        assert all(torch.equal(a, b) for a, b in zip(crops_a, crops_b, strict=True))
    assert not torch.equal(serial[0][1], serial[3][1])  # epoch 1 is reshuffled


def keys(sampler: ShardedEpochSampler) -> list[tuple[int, int]]:
    return list(sampler)


def test_sampler_reshuffles_each_epoch_deterministically() -> None:
    sampler = ShardedEpochSampler(50, 10, 0, 1, seed=3)
    assert sampler.batches_per_epoch == 5 and len(sampler) == 50
    epoch0 = keys(sampler)
    assert {e for e, _ in epoch0} == {0}
    assert sorted(i for _, i in epoch0) == list(range(50))
    assert keys(sampler) == epoch0  # iterating again repeats the epoch
    sampler.set_epoch(1)
    epoch1 = keys(sampler)
    assert {e for e, _ in epoch1} == {1}
    assert [i for _, i in epoch1] != [i for _, i in epoch0]
    assert keys(ShardedEpochSampler(50, 10, 0, 1, seed=3, start_epoch=1)) == epoch1
    assert keys(ShardedEpochSampler(50, 10, 0, 1, seed=4)) != epoch0


def test_two_ranks_concatenated_equal_one_process_with_global_batch() -> None:
    n, per_rank, world = 37, 4, 2  # 37 // 8 = 4 full global batches, 5 images dropped
    single = ShardedEpochSampler(n, per_rank * world, 0, 1, seed=9)
    ranks = [ShardedEpochSampler(n, per_rank, r, world, seed=9) for r in range(world)]
    for epoch in (0, 2):
        single.set_epoch(epoch)
        for sampler in ranks:
            sampler.set_epoch(epoch)
        whole = keys(single)
        shards = [keys(s) for s in ranks]
        assert len(whole) == 32 and [len(s) for s in shards] == [16, 16]
        assert len(ranks[0]) == len(ranks[1]) == 16
        for batch in range(4):
            joined = [key for shard in shards for key in shard[batch * 4 : (batch + 1) * 4]]
            assert joined == whole[batch * 8 : (batch + 1) * 8]
        assert not set(shards[0]) & set(shards[1])


def test_start_batch_skips_exactly_those_batches() -> None:
    full = keys(ShardedEpochSampler(40, 4, 1, 2, seed=0, start_epoch=3))
    resumed = ShardedEpochSampler(40, 4, 1, 2, seed=0, start_epoch=3, start_batch=2)
    assert len(resumed) == 4 * (5 - 2)
    assert keys(resumed) == full[2 * 4 :]
    resumed.set_epoch(3, start_batch=5)
    assert keys(resumed) == [] and len(resumed) == 0
    resumed.set_epoch(4)  # start_batch applies only to the epoch it was given with
    assert len(resumed) == 20
    with pytest.raises(ValueError, match="start_batch"):
        resumed.set_epoch(4, start_batch=6)


def test_sampler_rejects_dataset_smaller_than_global_batch() -> None:
    with pytest.raises(DataError, match="7 images, fewer than the global batch of 8"):
        ShardedEpochSampler(7, 4, 0, 2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ShardedEpochSampler(100, 4, 2, 2, seed=0)
