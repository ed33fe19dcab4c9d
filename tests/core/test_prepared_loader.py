"""Training from a prepared copy: batched crops keyed as the PIL path's, exact resume, and
the PIL path whenever the copy cannot serve the run."""

from __future__ import annotations

import math
import os
import shutil
from functools import partial
from pathlib import Path

import pytest
import torch

from swav_core.batch_multicrop import BatchMultiCrop
from swav_core.checkpoint import load_checkpoint
from swav_core.data import ShardedEpochSampler, mix_seed
from swav_core.errors import DataError
from swav_core.image_folder import scan_image_folder
from swav_core.prepared import (
    MANIFEST_FILE,
    METADATA_FILES,
    PreparedImages,
    read_manifest,
    shard_name,
    write_prepared,
    write_prepared_arrays,
)
from swav_core.prepared_loader import PreparedDataset, PreparedLoader
from swav_core.trainer import train
from tests.core.test_trainer import Recorder, _state_equal, tiny


@pytest.fixture(scope="module")
def prepared_shapes(shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prepared") / "shapes"
    write_prepared(scan_image_folder(shapes_dir), folder)
    return folder


def test_a_batch_is_the_multicrop_of_its_keys_seeds(prepared_shapes: Path) -> None:
    config = tiny(seed=7)
    images = PreparedImages(prepared_shapes)
    multicrop = BatchMultiCrop.from_config(config)
    sampler = ShardedEpochSampler(len(images), 8, rank=1, world_size=2, seed=config.seed)
    sampler.set_epoch(3, start_batch=2)
    keys = list(sampler)[:8]
    expected = multicrop(
        [torch.from_numpy(images[i].copy()) for _, i in keys],
        [mix_seed(config.seed, epoch, i) for epoch, i in keys],
    )
    dataset = PreparedDataset(images, config.seed)
    for workers in (0, 2):  # made in the training process, then in the loader's workers
        loader = PreparedLoader(dataset, sampler, multicrop, 8, workers, torch.device("cpu"))
        assert loader.crops_in_workers == (workers > 0)
        crops, indices = next(iter(loader))
        assert indices.tolist() == [i for _, i in keys]
        assert [c.shape for c in crops] == [e.shape for e in expected]
        for got, want in zip(crops, expected, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_training_from_the_prepared_copy(
    shapes_dir: Path, prepared_shapes: Path, tmp_path: Path
) -> None:
    events = Recorder()
    result = train(
        tiny(epochs=1), shapes_dir, tmp_path / "run", callbacks=[events],
        prepared_dir=prepared_shapes,
    )
    assert result.status == "completed" and result.step == 4
    assert events.of("started")[0]["data_path"] == "prepared"
    assert not events.of("warning")
    losses = [m["loss"] for m in events.of("metrics")]
    assert len(losses) == 4 and all(math.isfinite(loss) for loss in losses)


def test_exact_resume_mid_epoch_from_the_prepared_copy(
    shapes_dir: Path, prepared_shapes: Path, tmp_path: Path
) -> None:
    config = tiny(
        epochs=2,
        deterministic=True,
        queue_length=64,
        epoch_queue_starts=0,
        checkpoint_every_epochs=0,
    )
    whole = train(config, shapes_dir, tmp_path / "whole", prepared_dir=prepared_shapes)
    steps = iter(range(1, 100))
    first = train(
        config, shapes_dir, tmp_path / "split", should_stop=lambda: next(steps) >= 3,
        prepared_dir=prepared_shapes,
    )
    assert (first.status, first.step) == ("stopped", 3)  # step 3 of 4: mid-epoch
    second = train(config, shapes_dir, tmp_path / "split", prepared_dir=prepared_shapes)
    assert (second.status, second.step, second.loss) == ("completed", whole.step, whole.loss)

    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "final.pt")
    for key in ("model", "optimizer", "queues", "step", "epoch"):
        assert _state_equal(a[key], b[key]), key


def _fallback(shapes_dir: Path, prepared: Path, run: Path) -> dict[str, object]:
    events = Recorder()
    result = train(tiny(epochs=1), shapes_dir, run, callbacks=[events], prepared_dir=prepared)
    assert result.status == "completed"
    assert events.of("started")[0]["data_path"] == "pil"
    [warning] = events.of("warning")
    assert warning["code"] == "prepared_not_used"
    return warning


def test_a_cap_below_the_largest_crop_falls_back_to_pil(
    shapes_dir: Path, tmp_path: Path
) -> None:
    small = tmp_path / "capped"
    write_prepared(scan_image_folder(shapes_dir), small, max_short_side=16)  # crops of 32
    warning = _fallback(shapes_dir, small, tmp_path / "run")
    assert "16 px" in str(warning["message"]) and "32 px" in str(warning["message"])


def test_an_incomplete_copy_falls_back_to_pil(shapes_dir: Path, tmp_path: Path) -> None:
    half = tmp_path / "half"
    write_prepared(scan_image_folder(shapes_dir), half)
    (half / MANIFEST_FILE).unlink()  # as a crash before the manifest leaves it
    warning = _fallback(shapes_dir, half, tmp_path / "run")
    assert "incomplete" in str(warning["message"])
    assert str(half.parent) not in str(warning["message"])  # no server path in messages


def copy_from_store(store: Path, path: Path) -> bool:
    """A ShardFetch over a local folder standing for the artifact store; it logs each fetch
    in the store folder, so fetches made in loader worker processes are counted too."""
    if not (store / path.name).is_file():
        return False
    with (store / "fetched.log").open("a") as log:
        log.write(path.name + "\n")
    partial_copy = path.with_name(f".{path.name}.{os.getpid()}")
    shutil.copy(store / path.name, partial_copy)
    partial_copy.replace(path)  # whole or not at all, as the store's download lands
    return True


def test_without_the_images_the_copy_alone_trains_fetching_its_shards(
    shapes_dir: Path, prepared_shapes: Path, tmp_path: Path
) -> None:
    config = tiny(epochs=2, deterministic=True, num_workers=2)
    whole = train(config, shapes_dir, tmp_path / "whole", prepared_dir=prepared_shapes)

    full = PreparedImages(prepared_shapes)
    store = tmp_path / "store"  # the same copy in shards of about 40 images
    write_prepared_arrays(
        (full[i] for i in range(len(full))), store, fingerprint=full.manifest.fingerprint,
        max_short_side=full.manifest.max_short_side, shard_bytes=40 * 3 * 32 * 32,
        scan=full.scan(),
    )
    shards = len(read_manifest(store).shard_bytes)
    assert shards >= 3
    here = tmp_path / "here"
    here.mkdir()
    for name in METADATA_FILES:
        shutil.copy(store / name, here / name)

    events = Recorder()
    alone = train(
        config, tmp_path / "no-images", tmp_path / "alone", callbacks=[events],
        prepared_dir=here, fetch_shard=partial(copy_from_store, store),
    )
    assert (alone.status, alone.step, alone.loss) == ("completed", whole.step, whole.loss)
    assert events.of("started")[0]["data_path"] == "prepared"
    assert events.of("dataset")[0]["fingerprint"] == full.manifest.fingerprint
    # Every shard was fetched (two loader workers may both fetch one: once per machine is
    # the fetch's own lock, swav_service.prepared_copy.fetch_shard).
    fetched = (store / "fetched.log").read_text().split()
    assert set(fetched) == {shard_name(k) for k in range(shards)}
    a = load_checkpoint(tmp_path / "whole" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "alone" / "checkpoints" / "final.pt")
    assert _state_equal(a["model"], b["model"])


def test_without_the_images_a_copy_that_cannot_serve_is_a_data_error(
    shapes_dir: Path, tmp_path: Path
) -> None:
    small = tmp_path / "capped"
    write_prepared(scan_image_folder(shapes_dir), small, max_short_side=16)
    with pytest.raises(DataError, match="16 px, below the largest crop of 32 px"):
        train(tiny(epochs=1), tmp_path / "no-images", tmp_path / "run", prepared_dir=small)
