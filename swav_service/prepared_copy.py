"""A dataset's prepared copy (swav_core/prepared.py): written after validation, counted in
the tenant's stored bytes, mirrored to the artifact store.

Ingestion (worker/tasks.py) prepares every new dataset; `swav-service prepare-datasets`
prepares the ready datasets from before. The copy is an optimisation only: when it cannot
be written (an unreadable file, a full disk, the tenant's storage limit, an unreachable
store) the reason is logged, the folder removed, and the dataset stays ready; training then
decodes the images folder as before. The images folder stays the source of thumbnails,
embeddings and evaluation.

The dataset's `images_bytes` counts its extracted images and this copy together, so the
usage report and `SWAV_TENANT_MAX_STORED_BYTES` see both without a new column.

A worker on a machine that lacks the dataset trains from the copy alone
(`streamable_copy`): it fetches the copy's small metadata files, and the training child
fetches each shard from the store on first use (`fetch_shard`), so the images themselves
are never copied to it.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from swav_core.image_folder import ImageFolderScan, scan_image_folder
from swav_core.prepared import (
    MANIFEST_FILE,
    METADATA_FILES,
    PreparedIncomplete,
    PreparedManifest,
    is_prepared,
    read_manifest,
    refusal_for_crops,
    write_prepared,
)
from swav_service import quota
from swav_service.db import session_scope
from swav_service.layout import dataset_images_dir, dataset_prepared_dir
from swav_service.models import Dataset
from swav_service.settings import Settings, get_settings
from swav_service.storage import artifact_store

log = logging.getLogger(__name__)
READY = "ready"
Outcome = Literal["prepared", "already prepared", "not prepared"]


def prepare_dataset(settings: Settings, dataset_id: str, scan: ImageFolderScan) -> bool:
    """Write the prepared copy of the dataset whose images `scan` read, count its bytes and
    upload it (the manifest last); whether it is now complete. Never raises: a copy that
    could not be made is logged and removed."""
    folder = dataset_prepared_dir(settings, dataset_id)
    try:
        write_prepared(scan, folder, settings.prepared_max_short_side)
        total = quota.folder_bytes(scan.root) + quota.folder_bytes(folder)
        refusal = _count(settings, dataset_id, total)
        if refusal is not None:
            log.warning("dataset %s has no prepared copy: %s", dataset_id, refusal)
            shutil.rmtree(folder, ignore_errors=True)
            return False
        store = artifact_store(settings)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST_FILE)
        for path in [*files, folder / MANIFEST_FILE]:  # a remote reader sees it complete last
            store.upload(path)
    except Exception:
        log.exception("preparing dataset %s failed; training will decode its images", dataset_id)
        shutil.rmtree(folder, ignore_errors=True)
        return False
    return True


def _count(settings: Settings, dataset_id: str, total: int) -> str | None:
    """Record `total` (images + prepared copy) as the dataset's stored bytes, unless that
    takes its tenant past the limit or the dataset is gone: then why not."""
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            return "the dataset was deleted"
        what = f"the dataset's images and prepared copy ({quota.human_bytes(total)})"
        return quota.record_dataset_bytes(session, settings, dataset, total, what)


def prepare_ready_dataset(settings: Settings, dataset_id: str) -> Outcome:
    """Prepare a ready dataset that lacks a complete prepared copy of its current images
    (restored from the artifact store when this machine lacks them)."""
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != READY:
            return "not prepared"
        fingerprint = dataset.fingerprint
    folder = dataset_prepared_dir(settings, dataset_id)
    if is_prepared(folder, fingerprint) and read_manifest(folder).max_short_side == (
        settings.prepared_max_short_side
    ):
        return "already prepared"
    images = dataset_images_dir(settings, dataset_id)
    try:
        if not images.is_dir():
            artifact_store(settings).restore(images)
        scan = scan_image_folder(images, max_pixels=settings.max_dataset_image_pixels)
    except Exception:
        log.exception("dataset %s: its images could not be read", dataset_id)
        return "not prepared"
    return "prepared" if prepare_dataset(settings, dataset_id, scan) else "not prepared"


def streamable_copy(
    settings: Settings, dataset_id: str, fingerprint: str | None, size_crops: Sequence[int]
) -> Path | None:
    """The dataset's prepared copy when it can serve crops of `size_crops` on this worker,
    else None (train from the images).

    With a remote store, a copy missing here or made of other images (an older ingestion)
    is replaced by the store's metadata files, the manifest first: the store holds a
    complete copy once it holds the manifest, which is uploaded last. Its shards stay in
    the store until the training child reads them (`fetch_shard`).
    """
    folder = dataset_prepared_dir(settings, dataset_id)
    store = artifact_store(settings)

    def current() -> PreparedManifest | None:
        try:
            manifest = read_manifest(folder, shards_may_be_missing=store.remote)
        except PreparedIncomplete:
            return None
        return manifest if manifest.fingerprint == fingerprint else None

    manifest = current()
    if manifest is None and store.remote:
        shutil.rmtree(folder, ignore_errors=True)
        if all(store.fetch(folder / name) for name in METADATA_FILES):
            manifest = current()
    if manifest is None or refusal_for_crops(manifest, size_crops) is not None:
        return None
    return folder


def fetch_shard(path: Path) -> bool:
    """Bring one shard of a prepared copy from the artifact store (swav_core.prepared's
    ShardFetch). Ranks and loader workers of one machine wait on a lock beside the shard,
    so each shard is downloaded once; the download lands whole (atomic rename) or not."""
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return path.is_file() or artifact_store(get_settings()).fetch(path)
