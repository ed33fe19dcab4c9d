"""The image-folder scan, the keyed multi-crop dataset, the sharded sampler and the loader."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swav_core.data import (
    MultiCropDataset,
    ShardedEpochSampler,
    make_loader,
    scan_image_folder,
)
from swav_core.errors import DataError
from swav_core.images import load_rgb
from swav_core.multicrop import MultiCropTransform


def noise(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise(seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_flat(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise(100 + i, size=16).save(root / f"img_{i:03d}.png")
    return root


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    """cats/ and dogs/ with 6 valid images each of several kinds, plus 3 broken files."""
    root = tmp_path / "data"
    for name in ("dogs", "cats"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        noise(i).save(root / "cats" / f"c{i}.png")
        noise(10 + i).save(root / "dogs" / f"d{i}.jpg", quality=90)
    noise(3).save(root / "cats" / "c3.jpg")
    noise(4).convert("L").save(root / "cats" / "gray.png")
    noise(5).convert("P").save(root / "cats" / "palette.png")
    frames = [noise(20), noise(21)]
    frames[0].save(root / "dogs" / "anim.gif", save_all=True, append_images=frames[1:])
    noise(22).save(root / "dogs" / "d3.webp")
    noise(23).save(root / "dogs" / "d4.bmp")
    # a PNG saved under a .jpg name is still a valid image: the decoded format decides
    noise(24).save(root / "dogs" / "misnamed.jpg", format="PNG")

    data = jpeg_bytes(30)
    (root / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cats" / "notes.png").write_text("this is not a picture\n")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    noise(40).save(root / "cats" / "scan.tiff")
    (root / "cats" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    noise(41).save(root / ".cache" / "thumb.png")
    return root


def test_scan_keeps_valid_images_and_labels_by_class(class_dir: Path) -> None:
    scan = scan_image_folder(class_dir)
    assert scan.classes == ("cats", "dogs")
    assert scan.files == (
        "cats/c0.png",
        "cats/c1.png",
        "cats/c2.png",
        "cats/c3.jpg",
        "cats/gray.png",
        "cats/palette.png",
        "dogs/anim.gif",
        "dogs/d0.jpg",
        "dogs/d1.jpg",
        "dogs/d2.jpg",
        "dogs/d3.webp",
        "dogs/d4.bmp",
        "dogs/misnamed.jpg",
    )
    assert scan.labels == (0,) * 6 + (1,) * 7
    assert scan.sizes == tuple((class_dir / f).stat().st_size for f in scan.files)
    assert scan.root == class_dir


def test_scan_skips_broken_files_with_distinct_reasons(class_dir: Path) -> None:
    scan = scan_image_folder(class_dir)
    reasons = {skip.path: skip.reason for skip in scan.skipped}
    assert reasons == {
        "cats/empty.jpg": "empty file",
        "cats/notes.png": "not an image",
        "cats/scan.tiff": "unsupported format TIFF",
        "dogs/truncated.jpg": "truncated image",
    }
    assert [s.path for s in scan.skipped] == sorted(reasons)
    assert scan.skip_reasons() == {
        "empty file": 1,
        "not an image": 1,
        "unsupported format TIFF": 1,
        "truncated image": 1,
    }


def test_truncated_png_and_corrupt_header_are_skipped(tmp_path: Path) -> None:
    root = write_flat(tmp_path / "d", 2)
    buffer = io.BytesIO()
    noise(1).save(buffer, "PNG")
    (root / "cut.png").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    reasons = {s.path: s.reason for s in scan_image_folder(root).skipped}
    assert reasons == {"cut.png": "truncated image"}


def test_decompression_bomb_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_flat(tmp_path / "d", 1)  # 16 x 16 = 256 pixels
    noise(7, size=20).save(root / "warn.png")  # 400 pixels: over the limit -> warning
    noise(8, size=40).save(root / "error.png")  # 1600 pixels: over twice the limit -> error
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 300)
    scan = scan_image_folder(root)
    assert scan.files == ("img_000.png",)
    assert scan.skip_reasons() == {"decompression bomb": 2}


def test_scan_is_deterministic_and_fingerprint_tracks_changes(class_dir: Path) -> None:
    first, second = scan_image_folder(class_dir), scan_image_folder(class_dir, workers=1)
    assert first == second
    assert first.fingerprint() == second.fingerprint()
    assert len(first.fingerprint()) == 64

    noise(50).save(class_dir / "dogs" / "new.png")
    added = scan_image_folder(class_dir)
    assert added.fingerprint() != first.fingerprint()
    (class_dir / "dogs" / "new.png").unlink()
    assert scan_image_folder(class_dir).fingerprint() == first.fingerprint()

    # same names, one file re-encoded to a different size
    Image.new("RGB", (24, 24), (9, 9, 9)).save(class_dir / "cats" / "c0.png")
    assert scan_image_folder(class_dir).fingerprint() != first.fingerprint()


def test_flat_or_mixed_folder_has_no_labels(tmp_path: Path) -> None:
    flat = scan_image_folder(write_flat(tmp_path / "flat", 3))
    assert flat.labels is None and flat.classes is None
    assert flat.files == ("img_000.png", "img_001.png", "img_002.png")

    mixed = write_flat(tmp_path / "mixed", 2)
    (mixed / "sub").mkdir()
    noise(9).save(mixed / "sub" / "x.png")
    scan = scan_image_folder(mixed)
    assert scan.labels is None and scan.classes is None
    assert scan.files == ("img_000.png", "img_001.png", "sub/x.png")


def test_nested_images_take_their_first_level_class(tmp_path: Path) -> None:
    root = tmp_path / "nested"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a").mkdir()
    noise(1).save(root / "b" / "deep" / "x.png")
    noise(2).save(root / "a" / "y.png")
    (root / "README.txt").write_text("a broken file at the top does not disable classes")
    scan = scan_image_folder(root)
    assert scan.files == ("a/y.png", "b/deep/x.png")
    assert scan.classes == ("a", "b") and scan.labels == (0, 1)


def test_missing_folder_or_no_images_raise_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no such folder"):
        scan_image_folder(tmp_path / "absent")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(empty)
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"{i}.png").write_text("text")
    (junk / "z.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"4 files skipped.*not an image \(3\).*empty file \(1\)"):
        scan_image_folder(junk)


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_load_rgb_gives_rgb(tmp_path: Path, mode: str) -> None:
    gray = np.asarray(noise(3).convert("L"))
    if mode == "I;16":  # full-range 16 bits, as a 16-bit grayscale PNG holds
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        image = noise(3).convert(mode)
    assert image.mode == mode
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 24)
    if mode in ("L", "I;16"):  # 16 bits are scaled down to 8, not clipped to white
        for channel in range(3):
            assert np.array_equal(np.asarray(loaded)[..., channel], gray)


def test_load_rgb_takes_first_gif_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    pixels = np.asarray(load_rgb(tmp_path / "a.gif"))
    assert tuple(pixels[0, 0]) == (255, 0, 0)


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
