"""The image-folder scan: kept images, labels from class folders, skip reasons, fingerprint."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from swav_core.errors import DataError
from swav_core.image_folder import scan_image_folder
from tests.core.conftest import noise


def write_flat(root: Path, count: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        noise(100 + i, size=16).save(root / f"img_{i:03d}.png")
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

