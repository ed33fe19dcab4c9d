"""Prepared datasets: every image decoded once, shorter side capped, stored as uint8 shards.

Training decodes each image again every epoch; a prepared copy turns that into a memory
read. The format is plain numpy (bench/shard_formats.py compares it with litdata,
mosaicml-streaming and webdataset): shard files of concatenated (3, H, W) uint8 pixels,
an index of (shard, offset, height, width) per image, and a manifest written last.

    <folder>/shard-00000.bin ...   C-contiguous CHW pixels, image after image
    <folder>/index.npy             (N, 4) int64: shard number, byte offset, H, W
    <folder>/scan.json             the scan it was made from: names, sizes, labels, skips
    <folder>/manifest.json         format, image count, cap, the scan's fingerprint, shard sizes

Image i is `scan_image_folder(root).files[i]`, so indices, labels and the sampler's keys
line up with the images folder; with the scan recorded beside the pixels, a machine that
has only the prepared copy trains from it without the images. A folder is complete only
when its manifest exists and the files it names have the sizes it records: a crash
mid-write (no manifest, the old one is removed first) or a truncated shard is refused,
never read as a smaller dataset. A reader given a `fetch` (a remote worker streaming the
copy from the artifact store) may start with shards missing and fetches each on first use.
Torch-free, like `swav_core.images`, whose `load_rgb` is the one decoding rule used here.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import IO, Any

import numpy as np
from PIL import Image

from swav_core.atomic import atomic_write_bytes, atomic_writer, fsync_dir
from swav_core.errors import DataError
from swav_core.image_folder import ImageFolderScan, SkippedFile
from swav_core.images import load_rgb

FORMAT = "swav-prepared/2"  # /1 had no scan.json: such a copy is prepared again
MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.npy"
SCAN_FILE = "scan.json"
METADATA_FILES = (MANIFEST_FILE, INDEX_FILE, SCAN_FILE)  # what a reader needs before pixels
# The largest crop of any preset is 224 px (the paper's global crops; recipe.GPU_MAX_CROP),
# and 256 is the customary short side that 224 crops are taken from (ImageNet's
# Resize(256) + CenterCrop(224)). About 0.26 MB per 4:3 image.
DEFAULT_MAX_SHORT_SIDE = 256
# Shards bounded in size, so that a remote worker can fetch and cache them one by one.
SHARD_BYTES = 256 << 20
DECODE_THREADS = 4  # PIL decodes and resizes without the GIL
DECODE_CHUNK = 64  # images in flight at once: bounds the memory of a parallel decode


ShardFetch = Callable[[Path], bool]  # brings a missing shard file here; False: none exists


class PreparedIncomplete(DataError):
    """The prepared folder is missing, half-written or does not match its manifest."""

    code = "prepared_incomplete"


@dataclass(frozen=True)
class PreparedManifest:
    """What a complete prepared folder holds; `shard_bytes[k]` is the size of shard k."""

    num_images: int
    max_short_side: int
    fingerprint: str
    shard_bytes: tuple[int, ...]
    format: str = FORMAT

    @property
    def total_bytes(self) -> int:
        return sum(self.shard_bytes)

    def as_json(self) -> bytes:
        return json.dumps({**asdict(self), "shard_bytes": list(self.shard_bytes)}).encode()


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.bin"


def capped_size(width: int, height: int, max_short_side: int) -> tuple[int, int]:
    """(width, height) with the shorter side at most `max_short_side`, aspect kept; never larger."""
    if max_short_side < 1:
        raise ValueError(f"max_short_side={max_short_side} must be >= 1")
    short = min(width, height)
    if short <= max_short_side:
        return width, height
    scale = max_short_side / short
    if width <= height:
        return max_short_side, max(max_short_side, round(height * scale))
    return max(max_short_side, round(width * scale)), max_short_side


def capped_rgb(image: Image.Image, max_short_side: int) -> np.ndarray:
    """An RGB image as (3, H, W) uint8, downscaled (bilinear, antialiased: torchvision's
    RandomResizedCrop default) when its shorter side is above `max_short_side`."""
    size = capped_size(image.width, image.height, max_short_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.ascontiguousarray(np.asarray(image, dtype=np.uint8).transpose(2, 0, 1))


def _decode(path: Path, max_short_side: int) -> np.ndarray:
    try:
        return capped_rgb(load_rgb(path), max_short_side)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(
            f"{path.name} cannot be read any more ({exc}); the folder changed after its scan"
        ) from exc


def _decoded(scan: ImageFolderScan, max_short_side: int) -> Iterator[np.ndarray]:
    """The scan's images in order, decoded by a few threads a chunk at a time."""
    names = iter(scan.files)
    with ThreadPoolExecutor(DECODE_THREADS) as pool:
        while chunk := list(islice(names, DECODE_CHUNK)):
            yield from pool.map(lambda name: _decode(scan.root / name, max_short_side), chunk)


def write_prepared(
    scan: ImageFolderScan, out_dir: Path, max_short_side: int = DEFAULT_MAX_SHORT_SIDE
) -> PreparedManifest:
    """Decode every image of `scan` (in `scan.files` order) into a prepared folder at `out_dir`.

    Replaces what `out_dir` held; until it returns, `out_dir` is not complete.
    """
    capped_size(1, 1, max_short_side)  # the cap is checked before any work
    return write_prepared_arrays(
        _decoded(scan, max_short_side),
        out_dir,
        fingerprint=scan.fingerprint(),
        max_short_side=max_short_side,
        scan=scan,
    )


def write_prepared_arrays(
    images: Iterable[np.ndarray],
    out_dir: Path,
    *,
    fingerprint: str,
    max_short_side: int = 0,
    shard_bytes: int = SHARD_BYTES,
    scan: ImageFolderScan | None = None,
) -> PreparedManifest:
    """Write (3, H, W) uint8 arrays as a prepared folder, the manifest last (see module doc).

    Without `scan` (arrays of no folder) the record names the images by their number.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)  # incomplete from here on
    fsync_dir(out_dir)
    for stale in out_dir.glob("shard-*.bin"):
        stale.unlink()
    rows: list[tuple[int, int, int, int]] = []
    sizes: list[int] = []
    with contextlib.ExitStack() as shard:
        file: IO[bytes] | None = None
        for number, image in enumerate(images):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[0] != 3:
                raise ValueError(
                    f"image {number} is {image.dtype} {image.shape}; expected uint8 (3, H, W)"
                )
            if file is None or (sizes[-1] and sizes[-1] + image.nbytes > shard_bytes):
                shard.close()  # the previous shard is renamed into place
                sizes.append(0)
                file = shard.enter_context(atomic_writer(out_dir / shard_name(len(sizes) - 1)))
            rows.append((len(sizes) - 1, sizes[-1], image.shape[1], image.shape[2]))
            file.write(np.ascontiguousarray(image).data)
            sizes[-1] += image.nbytes
    with atomic_writer(out_dir / INDEX_FILE) as index_file:
        np.save(index_file, np.array(rows, dtype=np.int64).reshape(len(rows), 4))
    if scan is None:
        names = tuple(f"{i:08d}" for i in range(len(rows)))
        scan = ImageFolderScan(out_dir, names, None, None, (), tuple(0 for _ in names))
    if len(scan.files) != len(rows):
        raise ValueError(f"the scan names {len(scan.files)} images, {len(rows)} were written")
    atomic_write_bytes(out_dir / SCAN_FILE, scan_record(scan))
    manifest = PreparedManifest(len(rows), max_short_side, fingerprint, tuple(sizes))
    atomic_write_bytes(out_dir / MANIFEST_FILE, manifest.as_json())
    return manifest


def scan_record(scan: ImageFolderScan) -> bytes:
    """What training needs of a scan, as JSON: no pixels, no server path."""
    return json.dumps(
        {
            "files": scan.files,
            "sizes": scan.sizes,
            "labels": scan.labels,
            "classes": scan.classes,
            "skipped": [[skip.path, skip.reason] for skip in scan.skipped],
        }
    ).encode()


def scan_from_record(record: bytes, root: Path) -> ImageFolderScan:
    """The scan a prepared folder was made from, rooted at `root` (its images are not read)."""
    raw = json.loads(record)

    def maybe(values: Sequence[Any] | None) -> tuple[Any, ...] | None:
        return None if values is None else tuple(values)

    return ImageFolderScan(
        root=root,
        files=tuple(str(name) for name in raw["files"]),
        labels=maybe(raw["labels"]),
        classes=maybe(raw["classes"]),
        skipped=tuple(SkippedFile(str(path), str(reason)) for path, reason in raw["skipped"]),
        sizes=tuple(int(size) for size in raw["sizes"]),
    )


def refusal_for_crops(manifest: PreparedManifest, size_crops: Sequence[int]) -> str | None:
    """Why a copy capped at `manifest.max_short_side` cannot serve crops of `size_crops`
    (a smaller cap would crop from fewer pixels than the PIL path does), or None."""
    largest = max(size_crops)
    if manifest.max_short_side < largest:
        return (
            f"the prepared copy caps images at {manifest.max_short_side} px, below the "
            f"largest crop of {largest} px"
        )
    return None


def read_manifest(folder: Path, shards_may_be_missing: bool = False) -> PreparedManifest:
    """The manifest of a complete prepared folder; PreparedIncomplete when it is not one.

    With `shards_may_be_missing` (a reader that fetches them) only the shards present
    here are checked."""
    folder = Path(folder)
    try:
        raw: dict[str, Any] = json.loads((folder / MANIFEST_FILE).read_bytes())
        manifest = PreparedManifest(
            num_images=int(raw["num_images"]),
            max_short_side=int(raw["max_short_side"]),
            fingerprint=str(raw["fingerprint"]),
            shard_bytes=tuple(int(n) for n in raw["shard_bytes"]),
            format=str(raw["format"]),
        )
    except FileNotFoundError:
        raise PreparedIncomplete(f"{folder.name} has no {MANIFEST_FILE}: not prepared") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreparedIncomplete(f"{folder.name}/{MANIFEST_FILE} is unreadable ({exc})") from exc
    if manifest.format != FORMAT:
        raise PreparedIncomplete(f"{folder.name} is {manifest.format!r}, not {FORMAT!r}")
    for name in (INDEX_FILE, SCAN_FILE):
        if not (folder / name).is_file():
            raise PreparedIncomplete(f"{folder.name} has a manifest but no {name}")
    for number, expected in enumerate(manifest.shard_bytes):
        path = folder / shard_name(number)
        actual = path.stat().st_size if path.is_file() else None
        if actual is None and shards_may_be_missing:
            continue
        if actual != expected:
            raise PreparedIncomplete(
                f"{folder.name}/{path.name} holds {actual} bytes, the manifest says {expected}"
            )
    return manifest


def is_prepared(folder: Path, fingerprint: str | None = None) -> bool:
    """Whether `folder` is a complete prepared folder (of the scan with `fingerprint`, if given)."""
    try:
        manifest = read_manifest(folder)
    except PreparedIncomplete:
        return False
    return fingerprint is None or manifest.fingerprint == fingerprint


class PreparedImages:
    """`images[i]` -> image i as a read-only (3, H, W) uint8 view of its memory-mapped shard.

    Checks the folder is complete on opening. Shards are mapped on first use, in each
    process: a pickled reader (a DataLoader worker's copy) carries the path, not the pages.
    With `fetch`, a shard missing here is fetched on first use (then checked like the rest).
    """

    def __init__(self, folder: Path, fetch: ShardFetch | None = None) -> None:
        self.folder = Path(folder)
        self.fetch = fetch
        self.manifest = read_manifest(self.folder, shards_may_be_missing=fetch is not None)
        try:
            self.index = np.load(self.folder / INDEX_FILE)
        except (OSError, ValueError) as exc:
            raise PreparedIncomplete(
                f"{self.folder.name}/{INDEX_FILE} is unreadable ({exc})"
            ) from exc
        if self.index.shape != (self.manifest.num_images, 4):
            raise PreparedIncomplete(
                f"{self.folder.name}/{INDEX_FILE} has shape {self.index.shape}, "
                f"the manifest says {self.manifest.num_images} images"
            )
        self._shards: dict[int, np.memmap[Any, np.dtype[np.uint8]]] = {}

    def __len__(self) -> int:
        return self.manifest.num_images

    def scan(self) -> ImageFolderScan:
        """The scan of the images this copy was made from (its root is this folder)."""
        try:
            return scan_from_record((self.folder / SCAN_FILE).read_bytes(), self.folder)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise PreparedIncomplete(f"{self.folder.name}/{SCAN_FILE} is unreadable") from exc

    def shape(self, i: int) -> tuple[int, int, int]:
        _, _, height, width = self.index[i]
        return 3, int(height), int(width)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} of a prepared dataset of {len(self)}")
        shard, offset, height, width = (int(v) for v in self.index[i])
        pixels = self._shard(shard)
        return pixels[offset : offset + 3 * height * width].reshape(3, height, width)

    def _shard(self, number: int) -> np.memmap[Any, np.dtype[np.uint8]]:
        if number not in self._shards:
            path = self.folder / shard_name(number)
            if self.fetch is not None and not path.is_file() and not self.fetch(path):
                raise PreparedIncomplete(f"{self.folder.name}/{path.name} is not in the store")
            size = path.stat().st_size
            if size != self.manifest.shard_bytes[number]:
                raise PreparedIncomplete(
                    f"{self.folder.name}/{path.name} holds {size} bytes, "
                    f"the manifest says {self.manifest.shard_bytes[number]}"
                )
            self._shards[number] = np.memmap(path, dtype=np.uint8, mode="r")
        return self._shards[number]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_shards": {}}

