"""A dataset's embedding index in memory: unit vectors, paths, labels and a 2-D PCA map.

Built from the files of a succeeded batch embedding job (`embeddings.npy`, N x D float32
L2-normalised rows; `index.json`, the N relative paths), so the API never embeds a whole
dataset itself. `IndexCache` keeps the most recent indexes of this API process, keyed by
the embedding job id (its files never change), bounded by count and by bytes.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from swav_service.layout import EMBEDDINGS_FILE, INDEX_FILE

MAX_CACHED_INDEXES = 4
MAX_CACHED_BYTES = 1024**3  # the newest index stays even when alone over it
PCA_SEED = 0  # torch.pca_lowrank is randomised; a fixed seed keeps the map stable


@dataclass(frozen=True)
class Projection:
    """x -> (x - mean) @ axes: the first two principal axes of the rows.

    mean: (D,); axes: (D, 2), unit columns, each signed so that its largest-magnitude
    loading is positive (an SVD's signs are arbitrary; this makes the map reproducible);
    explained: the fraction of the total variance along each axis.
    """

    mean: np.ndarray
    axes: np.ndarray
    explained: tuple[float, float]

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        """(M, 2) coordinates of (M, D) rows."""
        return ((rows - self.mean) @ self.axes).astype(np.float32)


def principal_axes(rows: np.ndarray) -> Projection:
    """The 2-D PCA of (N, D) rows, with `torch.pca_lowrank` (randomised, O(N D q)).

    An exact SVD costs O(N D min(N, D)): minutes for 10^5 images of 2048 features, where
    the randomised one with a few power iterations takes seconds and matches the leading
    axes of well-separated spectra. Fewer than 2 rows or features, or no variance, give
    zero axes (every point at the origin) rather than an error.
    """
    import torch

    n, d = rows.shape
    mean = rows.mean(axis=0) if n else np.zeros(d, dtype=np.float32)
    axes = np.zeros((d, 2), dtype=np.float32)
    centered = rows - mean
    total = float((centered.astype(np.float64) ** 2).sum())
    rank = min(n, d)
    if rank == 0 or total == 0.0:
        return Projection(mean.astype(np.float32), axes, (0.0, 0.0))
    q = min(rank, 6)  # a little oversampling beyond the 2 axes wanted
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PCA_SEED)
        _, singular, v = torch.pca_lowrank(
            torch.from_numpy(np.ascontiguousarray(centered, dtype=np.float32)),
            q=q, center=False, niter=4,
        )
    kept = min(2, q)
    axes[:, :kept] = v[:, :kept].numpy()
    for column in range(kept):
        if axes[np.abs(axes[:, column]).argmax(), column] < 0:
            axes[:, column] *= -1
    variance = (singular[:kept].double() ** 2).tolist() + [0.0] * (2 - kept)
    explained = (variance[0] / total, variance[1] / total)
    return Projection(mean.astype(np.float32), axes, explained)


@dataclass(frozen=True)
class ExplorerIndex:
    """One checkpoint's embeddings of one dataset, ready for similarity search."""

    embedding_job_id: str
    checkpoint_id: str
    vectors: np.ndarray  # (N, D) float32, unit rows
    paths: tuple[str, ...]  # row i is the image at paths[i], relative to the images folder
    labels: tuple[str | None, ...]  # the class folder of each row, or None (no classes)
    projection: Projection
    coords: np.ndarray  # (N, 2) float32: projection(vectors)

    @property
    def nbytes(self) -> int:
        return int(self.vectors.nbytes + self.coords.nbytes)

    def nearest(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """The k rows most similar to `query` (D,): (row, cosine), best first.

        Rows and query are unit vectors, so the cosine is their dot product. Ties are
        broken by row (the sorted path order), so the answer does not depend on timing.
        """
        scores = self.vectors @ query.astype(np.float32)  # (N,)
        k = min(k, len(scores))
        if k == 0:
            return []
        top = np.argpartition(-scores, k - 1)[:k]
        order = sorted(top.tolist(), key=lambda row: (-float(scores[row]), row))
        return [(row, float(scores[row])) for row in order]


def load_index(
    embedding_job_id: str, checkpoint_id: str, folder: Path, labelled: bool
) -> ExplorerIndex:
    """Read an embedding job's files and compute their map; raises OSError / ValueError
    when the files are missing, unreadable or disagree (N rows, N paths)."""
    vectors = np.load(folder / EMBEDDINGS_FILE, allow_pickle=False)
    paths = json.loads((folder / INDEX_FILE).read_text())
    if (
        vectors.ndim != 2
        or not isinstance(paths, list)
        or len(paths) != len(vectors)
        or not all(isinstance(p, str) for p in paths)
    ):
        raise ValueError(f"embedding files in {folder.name} disagree: {vectors.shape} rows")
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    labels = tuple(p.split("/", 1)[0] if labelled and "/" in p else None for p in paths)
    projection = principal_axes(vectors)
    return ExplorerIndex(
        embedding_job_id, checkpoint_id, vectors, tuple(paths), labels, projection,
        projection(vectors),
    )


class IndexCache:
    """Loaded indexes, least recently used first out; one load per key at a time.

    Used from the request thread pool: a lock per key makes concurrent first requests
    share one load, and a global lock guards the table.
    """

    def __init__(
        self, max_indexes: int = MAX_CACHED_INDEXES, max_bytes: int = MAX_CACHED_BYTES
    ) -> None:
        self.max_indexes = max(1, max_indexes)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, ExplorerIndex] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}
        self.loads = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, load: Callable[[], ExplorerIndex]) -> ExplorerIndex:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:
            with self._lock:
                entry = self._entries.get(key)
            if entry is not None:  # loaded by the request we waited for
                return entry
            try:
                entry = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self.loads += 1
                self._entries[key] = entry
                while len(self._entries) > 1 and (
                    len(self._entries) > self.max_indexes
                    or sum(e.nbytes for e in self._entries.values()) > self.max_bytes
                ):
                    self._entries.popitem(last=False)
            return entry
