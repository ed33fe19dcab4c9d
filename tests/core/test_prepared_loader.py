"""Training from a prepared copy: batched crops keyed as the PIL path's, exact resume, and
the PIL path whenever the copy cannot serve the run."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from swav_core.batch_multicrop import BatchMultiCrop
from swav_core.checkpoint import load_checkpoint
from swav_core.data import ShardedEpochSampler, mix_seed
from swav_core.image_folder import scan_image_folder
from swav_core.prepared import MANIFEST_FILE, PreparedImages, write_prepared
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
