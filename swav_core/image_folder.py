"""A checked scan of an image folder: the decodable images, their labels, why others are out.

`scan_image_folder` decodes every file once, up front, so that a broken file is reported
with its reason before training starts instead of killing a DataLoader worker hours in.
Formats are allow-listed by what Pillow decodes, never by the file extension. The module
imports no torch.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from swav_core.errors import DataError
from swav_core.images import ALLOWED_FORMATS


@dataclass(frozen=True)
class SkippedFile:
    """A file of the folder that will not be trained on, and why."""

    path: str
    reason: str


@dataclass(frozen=True)
class ImageFolderScan:
    """The decodable images under `root`, in sorted order, with labels when the folder has classes.

    `files` are relative posix paths; `sizes` their byte sizes at scan time,
    `dimensions` their (width, height) in pixels and `grayscale` whether each holds no
    colour (a gray mode, or RGB with equal channels). `labels` and `classes` are None
    unless every image lives under a first-level subfolder.
    """

    root: Path
    files: tuple[str, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...] | None
    skipped: tuple[SkippedFile, ...]
    sizes: tuple[int, ...]
    dimensions: tuple[tuple[int, int], ...] = ()
    grayscale: tuple[bool, ...] = ()

    def fingerprint(self) -> str:
        """sha256 over the relative paths and byte sizes: changes when the dataset does."""
        digest = hashlib.sha256()
        for name, size in zip(self.files, self.sizes, strict=True):
            digest.update(f"{name}\0{size}\n".encode())
        return digest.hexdigest()

    def skip_reasons(self) -> dict[str, int]:
        """How many files were skipped for each reason, most frequent first."""
        return dict(Counter(skip.reason for skip in self.skipped).most_common())


class NoImagesError(DataError):
    """The folder holds no readable image; `skipped` says why each file was left out."""

    def __init__(self, message: str, skipped: tuple[SkippedFile, ...]) -> None:
        super().__init__(message)
        self.skipped = skipped


_DECODE_ERRORS = (OSError, ValueError, SyntaxError, IndexError, TypeError, EOFError)


@dataclass(frozen=True)
class _Checked:
    """One file's scan: its byte size, why it is skipped (None: kept), its pixels."""

    size: int
    reason: str | None
    dimensions: tuple[int, int] = (0, 0)
    grayscale: bool = False


_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"})


def _is_grayscale(image: Image.Image) -> bool:
    """A gray mode, or RGB whose channels agree: on an 8 px box-filtered thumbnail (pixel
    noise averages out), the channels' spread is at most 8 of 255 on average."""
    if image.mode in _GRAY_MODES:
        return True
    thumbnail = image.convert("RGB").resize((8, 8), Image.Resampling.BOX)
    pixels = np.asarray(thumbnail, dtype=np.int16)
    return bool((pixels.max(axis=2) - pixels.min(axis=2)).mean() <= 8)


def _check_image(path: Path, max_pixels: int | None) -> _Checked:
    """The byte size, and None with the pixel facts for a fully decodable allow-listed
    image, else the reason it is skipped."""
    try:
        size = path.stat().st_size
    except OSError:
        return _Checked(0, "unreadable file")
    if size == 0:
        return _Checked(0, "empty file")
    try:
        return _decode_problem(path, size, max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        return _Checked(size, "decompression bomb")
    except OSError:
        return _Checked(size, "unreadable file")


def _decode_problem(path: Path, size: int, max_pixels: int | None) -> _Checked:
    """Kept (reason None) when Pillow fully decodes the first frame of an allow-listed
    format, else the reason it is not.

    The declared width x height is checked against `max_pixels` before any pixel is
    decoded, so a few bytes declaring a huge image cost nothing.
    """
    with open(path, "rb") as handle:
        try:
            image = Image.open(handle)
        except _DECODE_ERRORS as exc:
            # Pillow's own OSErrors (no errno) mean the header did not parse, as when a
            # JPEG is cut inside its tables; an OSError with an errno is a failed read.
            if isinstance(exc, OSError) and exc.errno is not None:
                raise
            return _Checked(size, _unidentified_reason(handle, size))
        with image:
            if image.format not in ALLOWED_FORMATS:
                return _Checked(size, f"unsupported format {image.format}")
            if max_pixels is not None and image.width * image.height > max_pixels:
                return _Checked(size, "decompression bomb")
            try:
                image.seek(0)
                image.load()
            except _DECODE_ERRORS as exc:
                if _says_truncated(exc) or _declared_beyond_end(handle, size, image.format):
                    return _Checked(size, "truncated image")
                return _Checked(size, "corrupt image")
            return _Checked(size, None, image.size, _is_grayscale(image))


_SIGNATURES = {
    b"\xff\xd8\xff": "JPEG",
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"RIFF": "WEBP",
}


def _says_truncated(exc: BaseException) -> bool:
    return "truncat" in str(exc).lower()


def _declared_beyond_end(handle: BinaryIO, size: int, fmt: str | None) -> bool:
    """True when a WEBP's RIFF header declares more bytes than the file has."""
    if fmt != "WEBP":
        return False
    handle.seek(0)
    head = handle.read(12)
    return head[8:12] == b"WEBP" and int.from_bytes(head[4:8], "little") + 8 > size


def _unidentified_reason(handle: BinaryIO, size: int) -> str:
    """Why Pillow identified no format: a broken header of a known format, or not an image.

    A file cut short inside its header (a half-written JPEG, say) fails identification
    like a text file does; rerunning that format's decoder tells the two apart, and it
    counts as truncated when the decoder ran into the end of the file.
    """
    handle.seek(0)
    head = handle.read(16)
    fmt = next((f for magic, f in _SIGNATURES.items() if head.startswith(magic)), None)
    if fmt == "WEBP" and head[8:12] != b"WEBP":
        fmt = None
    if fmt is None:
        return "not an image"
    if _declared_beyond_end(handle, size, fmt):
        return "truncated image"
    Image.init()
    factory = Image.OPEN[fmt][0]
    handle.seek(0)
    try:
        factory(handle, "").close()
    except Exception as exc:  # noqa: BLE001 (any failure of the decoder is the answer)
        ran_out = _says_truncated(exc) or handle.tell() >= size
        return "truncated image" if ran_out else "corrupt image"
    return "corrupt image"


def _candidate_files(root: Path) -> list[str]:
    """Sorted relative posix paths of the regular files under root, hidden entries left out."""
    found: list[str] = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if not d.startswith(".")]
        base = Path(folder)
        found.extend(
            (base / name).relative_to(root).as_posix()
            for name in names
            if not name.startswith(".") and (base / name).is_file()
        )
    return sorted(found)


def scan_image_folder(
    root: Path, workers: int | None = None, max_pixels: int | None = None
) -> ImageFolderScan:
    """Decode every file under `root` (recursively) and keep the readable images.

    Class labels come from the first-level subfolders when every image lives in one
    (classes sorted by name, as torchvision's ImageFolder does). Files that cannot be
    fully decoded, are not JPEG/PNG/WEBP/BMP/GIF, or declare more than `max_pixels`
    pixels (default: Pillow's `Image.MAX_IMAGE_PIXELS`, the decompression-bomb limit)
    are listed in `skipped` with a reason; the format is told by decoding, never by the
    extension. Pillow itself refuses more than twice its own limit, so a larger
    `max_pixels` has no effect beyond that. Decoding runs on `workers` threads (default:
    up to 8). Raises `DataError` when `root` is not a folder, `NoImagesError` (a
    DataError naming no server path) when it holds no readable image.
    """
    root = Path(root)
    if not root.is_dir():
        problem = "is not a folder" if root.exists() else "no such folder"
        raise DataError(f"dataset folder {root}: {problem}")
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if limit is not None and limit < 1:
        raise ValueError(f"max_pixels={max_pixels} must be >= 1")
    candidates = _candidate_files(root)
    n_threads = workers or min(8, os.cpu_count() or 1)
    check = partial(_check_image, max_pixels=limit)
    # Pillow only warns between its limit and twice it; `limit` decides instead. The
    # filter is process-wide, so it also covers the pool's threads while they run.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with ThreadPoolExecutor(max_workers=max(1, n_threads)) as pool:
            checks = list(pool.map(check, (root / name for name in candidates)))

    files: list[str] = []
    sizes: list[int] = []
    dimensions: list[tuple[int, int]] = []
    grayscale: list[bool] = []
    skipped: list[SkippedFile] = []
    for name, checked in zip(candidates, checks, strict=True):
        if checked.reason is None:
            files.append(name)
            sizes.append(checked.size)
            dimensions.append(checked.dimensions)
            grayscale.append(checked.grayscale)
        else:
            skipped.append(SkippedFile(name, checked.reason))

    if not files:
        raise NoImagesError(_no_images_message(skipped), tuple(skipped))

    labels: tuple[int, ...] | None = None
    classes: tuple[str, ...] | None = None
    if all("/" in name for name in files):
        class_of = [name.split("/", 1)[0] for name in files]
        classes = tuple(sorted(set(class_of)))
        index = {name: i for i, name in enumerate(classes)}
        labels = tuple(index[c] for c in class_of)
    return ImageFolderScan(
        root=root,
        files=tuple(files),
        labels=labels,
        classes=classes,
        skipped=tuple(skipped),
        sizes=tuple(sizes),
        dimensions=tuple(dimensions),
        grayscale=tuple(grayscale),
    )


def _no_images_message(skipped: list[SkippedFile]) -> str:
    """Why a folder has no image, without its path: the service shows this to uploaders."""
    if not skipped:
        return "no images in the dataset folder: it has no files (hidden files are ignored)"
    top = Counter(skip.reason for skip in skipped).most_common(3)
    reasons = ", ".join(f"{reason} ({count})" for reason, count in top)
    return (
        f"no readable image: {len(skipped)} files skipped, top reasons: {reasons}; "
        "accepted formats are JPEG, PNG, WEBP, BMP and GIF"
    )
