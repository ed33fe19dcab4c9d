"""Prepared datasets (swav_core/prepared.py): the pixels read back are those of the one
decoding rule after the cap's resize, in the scan's order, and a folder that was not
finished (no manifest, a short shard or index) is refused rather than read as complete."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swav_core.image_folder import scan_image_folder
from swav_core.images import load_rgb
from swav_core.prepared import (
    INDEX_FILE,
    MANIFEST_FILE,
    METADATA_FILES,
    SCAN_FILE,
    PreparedImages,
    PreparedIncomplete,
    capped_size,
    is_prepared,
    read_manifest,
    shard_name,
    write_prepared,
    write_prepared_arrays,
)

CAP = 24
# (name, width, height, mode): both orientations, above and below the cap, and modes that
# load_rgb converts (grayscale, palette, RGBA)
IMAGES = [
    ("a/wide.png", 60, 30, "RGB"),
    ("a/tall.png", 25, 70, "L"),
    ("a/small.png", 20, 12, "RGB"),
    ("b/exact.png", 24, 40, "RGBA"),
    ("b/palette.png", 50, 50, "P"),
    ("b/photo.jpg", 90, 48, "RGB"),
]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    rng = np.random.default_rng(0)
    for name, width, height, mode in IMAGES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        channels = {"RGB": 3, "RGBA": 4}.get(mode, 1)
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
        image = Image.fromarray(pixels, "RGBA" if mode == "RGBA" else None)
        image = image.convert(mode) if mode in {"L", "P"} else image
        image.save(root / name)
    return root


def expected(path: Path, cap: int) -> np.ndarray:
    """load_rgb, then PIL's bilinear resize to the capped size, as (3, H, W)."""
    image = load_rgb(path)
    size = capped_size(image.width, image.height, cap)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image).transpose(2, 0, 1)


def test_round_trip_in_scan_order_equals_load_rgb_then_the_resize(
    folder: Path, tmp_path: Path
) -> None:
    scan = scan_image_folder(folder)
    manifest = write_prepared(scan, tmp_path / "prepared", max_short_side=CAP)
    images = PreparedImages(tmp_path / "prepared")
    assert len(images) == manifest.num_images == len(scan.files) == len(IMAGES)
    assert manifest.fingerprint == scan.fingerprint() and manifest.max_short_side == CAP
    for i, name in enumerate(scan.files):
        pixels = images[i]
        assert pixels.dtype == np.uint8 and not pixels.flags.writeable
        assert np.array_equal(pixels, expected(folder / name, CAP)), name
        assert images.shape(i) == pixels.shape


def test_the_cap_bounds_the_shorter_side_and_never_upscales(folder: Path, tmp_path: Path) -> None:
    scan = scan_image_folder(folder)
    write_prepared(scan, tmp_path / "prepared", max_short_side=CAP)
    images = PreparedImages(tmp_path / "prepared")
    shapes = {name: images[i].shape[1:] for i, name in enumerate(scan.files)}
    assert shapes["a/wide.png"] == (24, 48)  # 60 x 30 -> short side 24, aspect kept
    assert shapes["a/tall.png"] == (67, 24)  # 25 x 70 -> round(70 * 24 / 25) = 67
    assert shapes["b/photo.jpg"] == (24, 45)
    assert shapes["b/exact.png"] == (40, 24)  # at the cap: as it is
    small = images[scan.files.index("a/small.png")]
    assert small.shape == (3, 12, 20)  # below the cap: as it is, not upscaled
    assert np.array_equal(small, np.asarray(load_rgb(folder / "a/small.png")).transpose(2, 0, 1))
    assert capped_size(4000, 3000, 256) == (341, 256)
    with pytest.raises(ValueError, match="max_short_side=0"):
        capped_size(10, 10, 0)


def test_shards_split_at_their_size_and_the_reader_pickles_without_its_pages(
    tmp_path: Path,
) -> None:
    arrays = [np.full((3, 10, 10 + i), i, np.uint8) for i in range(5)]
    manifest = write_prepared_arrays(arrays, tmp_path / "p", fingerprint="f", shard_bytes=700)
    assert manifest.shard_bytes == (300 + 330, 360, 390, 420)  # a shard ends before 700 bytes
    images = PreparedImages(tmp_path / "p")
    assert all(np.array_equal(images[i], arrays[i]) for i in range(5))
    copy = pickle.loads(pickle.dumps(images))
    assert copy._shards == {} and np.array_equal(copy[4], arrays[4])
    with pytest.raises(IndexError):
        images[5]


def test_a_partial_folder_is_not_complete(folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "prepared"
    scan = scan_image_folder(folder)
    write_prepared(scan, out, max_short_side=CAP)
    assert is_prepared(out, scan.fingerprint()) and not is_prepared(out, "another scan")

    shard = out / shard_name(0)
    data = shard.read_bytes()
    shard.write_bytes(data[:-1])  # a torn copy (a download cut short, a full disk)
    assert not is_prepared(out)
    with pytest.raises(PreparedIncomplete, match="the manifest says"):
        PreparedImages(out)
    shard.write_bytes(data)

    np.save(out / INDEX_FILE, np.zeros((2, 4), np.int64))
    with pytest.raises(PreparedIncomplete, match="has shape"):
        PreparedImages(out)

    def crashing() -> object:  # a rewrite that dies half-way: the old manifest is gone
        yield np.zeros((3, 4, 4), np.uint8)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_prepared_arrays(crashing(), out, fingerprint="f")  # type: ignore[arg-type]
    assert not (out / MANIFEST_FILE).exists() and not is_prepared(out)
    with pytest.raises(PreparedIncomplete, match="no manifest.json"):
        read_manifest(out)
    assert not any(p.name.startswith(".") for p in out.iterdir())  # no temporary left

    (out / MANIFEST_FILE).write_text("{")
    with pytest.raises(PreparedIncomplete, match="unreadable"):
        read_manifest(out)


def test_the_scan_is_recorded_beside_the_pixels(folder: Path, tmp_path: Path) -> None:
    (folder / "b" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    scan = scan_image_folder(folder)
    assert scan.skipped and scan.classes == ("a", "b")
    write_prepared(scan, tmp_path / "prepared", max_short_side=CAP)
    recorded = PreparedImages(tmp_path / "prepared").scan()
    assert recorded.files == scan.files and recorded.sizes == scan.sizes
    assert recorded.labels == scan.labels and recorded.classes == scan.classes
    assert recorded.skipped == scan.skipped
    assert recorded.fingerprint() == scan.fingerprint()
    assert str(folder) not in (tmp_path / "prepared" / SCAN_FILE).read_text()

    (tmp_path / "prepared" / SCAN_FILE).unlink()  # a folder without it is not complete
    assert not is_prepared(tmp_path / "prepared")


def test_a_reader_with_a_fetch_brings_each_missing_shard_on_first_use(tmp_path: Path) -> None:
    arrays = [np.full((3, 10, 10 + i), i, np.uint8) for i in range(5)]
    store = tmp_path / "store"
    manifest = write_prepared_arrays(arrays, store, fingerprint="f", shard_bytes=700)
    here = tmp_path / "here"
    here.mkdir()
    for name in METADATA_FILES:
        shutil.copy(store / name, here / name)
    fetched: list[str] = []

    def fetch(path: Path) -> bool:
        fetched.append(path.name)
        if not (store / path.name).is_file():
            return False
        shutil.copy(store / path.name, path)
        return True

    with pytest.raises(PreparedIncomplete, match="the manifest says"):
        PreparedImages(here)  # without a fetch, missing shards make it incomplete
    images = PreparedImages(here, fetch)
    assert np.array_equal(images[4], arrays[4]) and np.array_equal(images[3], arrays[3])
    assert np.array_equal(images[0], arrays[0])
    assert fetched == [shard_name(3), shard_name(2), shard_name(0)]  # once each, when read
    assert len(manifest.shard_bytes) == 4 and not (here / shard_name(1)).exists()

    (store / shard_name(1)).unlink()
    with pytest.raises(PreparedIncomplete, match="not in the store"):
        images[2]
    (here / shard_name(2)).write_bytes(b"short")  # a torn file is never mapped
    with pytest.raises(PreparedIncomplete, match="the manifest says"):
        PreparedImages(here, fetch)
