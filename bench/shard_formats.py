"""Shard formats for prepared (decoded uint8) images: write and random-read cost.

Compares a plain numpy memmap (concatenated CHW pixels + an index of offsets and shapes,
as swav_core/prepared.py writes it), litdata, mosaicml-streaming and webdataset on the
same synthetic images of varying sizes (shorter side 160..256, the prepared cap's range).

The training sampler (swav_core/data.py) is index-based: it asks for image `index` in a
shuffled order, so what matters is the cost of `dataset[i]` in a random order. webdataset
has no random access (tar streams, read in order): its figure is per image of an in-order
pass, which a shuffled index-based sampler cannot use.

    python bench/shard_formats.py --images 400 --formats memmap,litdata,webdataset
    # mosaicml-streaming pins numpy<2.2: run it from a separate environment
    /tmp/sb-venv/bin/python bench/shard_formats.py --formats streaming

Prints one JSON line per format: write seconds per image (pixel generation excluded),
random-read microseconds per image (page cache warm, after one pass), bytes on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

SEED = 0


def synthetic_image(index: int) -> np.ndarray:
    """A (3, H, W) uint8 image whose shorter side is in 160..256, shape varying by index."""
    rng = np.random.default_rng(index)
    short = int(rng.integers(160, 257))
    long = int(short * rng.uniform(1.0, 1.6))
    h, w = (short, long) if index % 2 else (long, short)
    return rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------- memmap


def memmap_write(out: Path, n: int) -> None:
    from swav_core.prepared import write_prepared_arrays

    write_prepared_arrays((synthetic_image(i) for i in range(n)), out, fingerprint="bench")


def memmap_reader(out: Path) -> Callable[[int], np.ndarray]:
    from swav_core.prepared import PreparedImages

    images = PreparedImages(out)
    return lambda i: np.array(images[i])  # a copy, as a loader worker would hand on


# ---------------------------------------------------------------- litdata


def _litdata_item(index: int) -> dict[str, object]:
    return {"index": index, "image": synthetic_image(index)}


def litdata_write(out: Path, n: int) -> None:
    import litdata

    litdata.optimize(
        fn=_litdata_item, inputs=list(range(n)), output_dir=str(out),
        chunk_bytes="64MB", num_workers=1, verbose=False, reorder_files=False,
    )


def litdata_reader(out: Path) -> Callable[[int], np.ndarray]:
    import litdata

    dataset = litdata.StreamingDataset(str(out))
    return lambda i: dataset[i]["image"]


# ---------------------------------------------------------------- mosaicml-streaming


def streaming_write(out: Path, n: int) -> None:
    from streaming import MDSWriter

    columns = {"index": "int", "image": "ndarray:uint8"}
    with MDSWriter(out=str(out), columns=columns, size_limit="64mb") as writer:
        for i in range(n):
            writer.write({"index": i, "image": synthetic_image(i)})


def streaming_reader(out: Path) -> Callable[[int], np.ndarray]:
    from streaming import StreamingDataset

    dataset = StreamingDataset(local=str(out), shuffle=False, batch_size=1)
    return lambda i: dataset[i]["image"]


# ---------------------------------------------------------------- webdataset


def webdataset_write(out: Path, n: int) -> None:
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(out / "shard-%05d.tar"), maxsize=64 << 20, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"{i:08d}", "npy": synthetic_image(i)})


def webdataset_in_order(out: Path) -> Iterator[np.ndarray]:
    import webdataset as wds

    shards = sorted(str(p) for p in out.glob("shard-*.tar"))
    for sample in wds.WebDataset(shards, shardshuffle=False).decode():
        yield sample["npy"]


Reader = Callable[[Path], Callable[[int], np.ndarray]]
FORMATS: dict[str, tuple[Callable[[Path, int], None], Reader | None]] = {
    "memmap": (memmap_write, memmap_reader),
    "litdata": (litdata_write, litdata_reader),
    "streaming": (streaming_write, streaming_reader),
    "webdataset": (webdataset_write, None),
}


def measure(name: str, n: int, root: Path, generate_s: float) -> dict[str, object]:
    write, reader = FORMATS[name]
    out = root / name
    start = time.perf_counter()
    write(out, n)
    write_s = time.perf_counter() - start - generate_s
    row: dict[str, object] = {
        "format": name,
        "images": n,
        "write_ms_per_image": round(1000 * write_s / n, 3),
        "disk_mb": round(folder_bytes(out) / 2**20, 1),
    }
    order = np.random.default_rng(SEED).permutation(n).tolist()
    if reader is None:
        for _ in webdataset_in_order(out):  # warm the page cache
            pass
        start = time.perf_counter()
        count = sum(1 for _ in webdataset_in_order(out))
        row["in_order_us_per_image"] = round(1e6 * (time.perf_counter() - start) / count, 1)
        row["random_access"] = False
        return row
    get = reader(out)
    for i in order:  # warm the page cache and the reader's open files
        get(i)
    start = time.perf_counter()
    for i in order:
        image = get(i)
    elapsed = time.perf_counter() - start
    assert np.array_equal(image, synthetic_image(order[-1])), f"{name} read back other pixels"
    row["random_read_us_per_image"] = round(1e6 * elapsed / n, 1)
    row["random_access"] = True
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--formats", default="memmap,litdata,webdataset")
    args = parser.parse_args()
    start = time.perf_counter()
    for i in range(args.images):
        synthetic_image(i)
    generate_s = time.perf_counter() - start
    root = Path(tempfile.mkdtemp(prefix="shard-formats-"))
    try:
        for name in args.formats.split(","):
            print(json.dumps(measure(name, args.images, root, generate_s)), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        os.sync()


if __name__ == "__main__":
    main()
