"""Artifacts that every machine sees: the artifacts folder, and optionally an S3 store.

Processes always read and write files in the artifacts folder (`SWAV_ARTIFACTS_DIR`).
When that folder is shared (NFS), nothing more is needed, and `ArtifactStore` does
nothing. With `SWAV_STORAGE_URL=s3://bucket/prefix`, `S3Store` (boto3) also keeps the
files that must outlive one machine in an S3-compatible store (AWS S3, MinIO, Ceph):

- checkpoints: the runner uploads each one (sidecar first, as the trainer commits it)
  before it records the checkpoint, and deletes it when the trainer prunes it; a worker
  restores the run's checkpoints before it trains, so a job resumes on any machine;
- dataset images: uploaded after ingestion, restored by a worker that lacks them, and
  removed by the workers' reconciler once the dataset is deleted (worker/store_sweep.py);
- downloads: the API streams a checkpoint from the store, and fetches one into its own
  folder only to export it (safetensors) or embed with it.

An object's key is the prefix and the file's path relative to the artifacts folder, so
the store mirrors the folder's layout.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from swav_core.atomic import atomic_writer
from swav_core.checkpoint_names import FINAL_NAME, SIDECAR_SUFFIX
from swav_service.settings import Settings

CHUNK_BYTES = 1024 * 1024


class StorageError(Exception):
    """The store refused or could not be reached (after boto3's own retries)."""


class ArtifactStore:
    """The artifacts folder alone (local disk or NFS): what is written there is shared."""

    remote = False

    def __init__(self, root: Path) -> None:
        self.root = root

    def upload(self, path: Path) -> None:
        """Copy a file of the artifacts folder to the store."""

    def upload_tree(self, folder: Path) -> int:
        """Upload every file under `folder`; how many."""
        return 0

    def delete(self, path: Path) -> None:
        """Remove a file's copy from the store (if any)."""

    def folders(self, folder: Path) -> list[str]:
        """Names of the store's folders directly under `folder`."""
        return []

    def delete_tree(self, folder: Path) -> int:
        """Remove every object the store holds under `folder`; how many."""
        return 0

    def restore(
        self, folder: Path, exact: bool = False, recorded: Collection[Path] = ()
    ) -> int:
        """Download what the store holds under `folder` and the folder lacks; how many.
        `exact`: also reconcile the folder's checkpoints with the store's (S3Store)."""
        return 0

    def fetch(self, path: Path) -> bool:
        """Make sure the file is in the artifacts folder; whether it now is."""
        return path.is_file()

    def stream(self, path: Path) -> tuple[int, Iterator[bytes]] | None:
        """(size, chunks) of the stored file, or None if the store does not hold it."""
        return None


class S3Store(ArtifactStore):
    """Files of the artifacts folder mirrored in an S3 bucket under a prefix (boto3)."""

    remote = True

    def __init__(self, root: Path, bucket: str, prefix: str, client: Any) -> None:
        super().__init__(root)
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client

    def key(self, path: Path) -> str:
        """The object key of a file under the artifacts folder (ValueError if outside)."""
        relative = path.resolve().relative_to(self.root).as_posix()
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def path_of(self, key: str) -> Path:
        relative = key[len(self.prefix) + 1 :] if self.prefix else key
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"object {key!r} names a path outside the artifacts folder")
        return path

    def upload(self, path: Path) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self.key(path))
        except FileNotFoundError:
            raise
        except Exception as error:
            raise StorageError(f"cannot upload {path.name}: {error}") from error

    def upload_tree(self, folder: Path) -> int:
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        for path in files:
            self.upload(path)
        return len(files)

    def delete(self, path: Path) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key(path))
        except Exception as error:
            raise StorageError(f"cannot delete {path.name}: {error}") from error

    def _prefix(self, folder: Path) -> str:
        return self.key(folder).rstrip("/") + "/"

    def folders(self, folder: Path) -> list[str]:
        prefix = self._prefix(folder)
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            return [
                item["Prefix"][len(prefix) :].rstrip("/")
                for page in pages
                for item in page.get("CommonPrefixes", [])
            ]
        except Exception as error:
            raise StorageError(f"cannot list {folder.name} in the store: {error}") from error

    def delete_tree(self, folder: Path) -> int:
        """In batches of 1000 keys, the most one DeleteObjects request takes."""
        prefix = self._prefix(folder)
        deleted = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix
            )
            for page in pages:  # at most 1000 keys a page
                batch = [{"Key": item["Key"]} for item in page.get("Contents", [])]
                if not batch:
                    continue
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
                if answer.get("Errors"):
                    first = answer["Errors"][0]
                    raise StorageError(
                        f"cannot delete {first.get('Key')}: {first.get('Message')}"
                    )
                deleted += len(batch)
        except StorageError:
            raise
        except Exception as error:
            raise StorageError(f"cannot delete {folder.name} from the store: {error}") from error
        return deleted

    def _download(self, key: str, path: Path) -> None:
        """Through swav_core.atomic: never a torn file, durable once here."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as file:
            self.client.download_fileobj(self.bucket, key, file)

    def _read(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())

    def restore(
        self, folder: Path, exact: bool = False, recorded: Collection[Path] = ()
    ) -> int:
        """Objects under `folder` that are missing here, differ in size, or (checkpoints)
        whose sidecar differs from the local one are downloaded; sidecars are always
        compared, so a file left by an older run on this machine is replaced.

        With `exact`, the folder's checkpoints that the store lacks are reconciled
        (`_reconcile`): uploaded when they may be the only copy of the job's progress,
        removed when the store holds newer ones. A store that holds none for the folder
        changes nothing here (a run that began before the store was configured, or whose
        first checkpoint was never uploaded: the trainer resumes from it on this machine).
        """
        prefix = self._prefix(folder)
        try:
            objects = {
                item["Key"]: int(item["Size"])
                for page in self.client.get_paginator("list_objects_v2").paginate(
                    Bucket=self.bucket, Prefix=prefix
                )
                for item in page.get("Contents", [])
            }
            stale: set[str] = set()
            stored_order: list[tuple[int, bool]] = []
            for key in objects:
                if key.endswith(SIDECAR_SUFFIX):
                    path = self.path_of(key)
                    data = self._read(key)
                    order = _checkpoint_order(path.name.removesuffix(SIDECAR_SUFFIX), data)
                    if order is not None:
                        stored_order.append(order)
                    if not path.is_file() or path.read_bytes() != data:
                        stale.add(key.removesuffix(SIDECAR_SUFFIX))
            fetched = 0
            for key, size in sorted(objects.items()):  # `x.pt` before `x.pt.sha256`
                path = self.path_of(key)
                current = path.is_file() and path.stat().st_size == size
                if current and key.removesuffix(SIDECAR_SUFFIX) not in stale:
                    continue
                self._download(key, path)
                fetched += 1
            if exact and objects and folder.is_dir():
                kept = {self.path_of(key) for key in objects}
                self._reconcile(folder, kept, max(stored_order, default=None), recorded)
        except StorageError:
            raise
        except Exception as error:
            raise StorageError(f"cannot restore {folder.name} from the store: {error}") from error
        return fetched

    def _reconcile(
        self,
        folder: Path,
        stored: set[Path],
        newest_stored: tuple[int, bool] | None,
        recorded: Collection[Path],
    ) -> None:
        """The folder's checkpoints that the store lacks: each is the only copy there is.

        Uploaded (sidecar first, as the runner uploads them) when the job recorded it
        (`recorded`: its upload failed, yet its row says available) or it is newer than
        every stored checkpoint (its worker died before uploading it: the job's latest
        progress). Removed otherwise: a later run elsewhere went past it and pruned it from
        the store, so resuming from it would go back in time. A checkpoint without its
        sidecar never committed (the trainer writes the sidecar first), nor does a sidecar
        alone: both are removed.
        """
        recorded = {path.resolve() for path in recorded}
        for path in sorted(folder.iterdir()):
            if not path.name.endswith(".pt") or path.resolve() in stored:
                continue
            sidecar = path.with_name(path.name + SIDECAR_SUFFIX)
            order = _checkpoint_order(path.name, sidecar.read_bytes()) if sidecar.is_file() \
                else None
            newer = order is not None and (newest_stored is None or order > newest_stored)
            if order is not None and (newer or path.resolve() in recorded):
                self.upload(sidecar)
                self.upload(path)
                continue
            path.unlink(missing_ok=True)
            sidecar.unlink(missing_ok=True)
        for sidecar in folder.glob("*.pt" + SIDECAR_SUFFIX):
            checkpoint = sidecar.with_name(sidecar.name.removesuffix(SIDECAR_SUFFIX))
            if not checkpoint.exists() and sidecar.resolve() not in stored:
                sidecar.unlink(missing_ok=True)

    def fetch(self, path: Path) -> bool:
        if path.is_file():
            return True
        try:
            self._download(self.key(path), path)
        except Exception as error:
            if _not_found(error):
                return False
            raise StorageError(f"cannot fetch {path.name}: {error}") from error
        return True

    def stream(self, path: Path) -> tuple[int, Iterator[bytes]] | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key(path))
        except Exception as error:
            if _not_found(error):
                return None
            raise StorageError(f"cannot read {path.name}: {error}") from error
        body = answer["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK_BYTES)
            finally:
                body.close()

        return int(answer["ContentLength"]), chunks()


def _checkpoint_order(name: str, sidecar: bytes) -> tuple[int, bool] | None:
    """(step, final) of a checkpoint from its sidecar (final.pt comes after the step
    checkpoint of its step), or None when the sidecar is unreadable."""
    try:
        step = json.loads(sidecar)["step"]
    except (ValueError, KeyError, TypeError):
        return None
    return (step, name == FINAL_NAME) if isinstance(step, int) else None


def _not_found(error: Exception) -> bool:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code")) in {"404", "NoSuchKey", "NotFound"}


@lru_cache(maxsize=8)
def _s3_store(
    root: Path,
    url: str,
    endpoint_url: str | None,
    region: str | None,
    access_key_id: str | None,
    secret_access_key: str | None,
) -> S3Store:
    import boto3
    from botocore.config import Config

    parsed = urlparse(url)
    client = boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        aws_access_key_id=access_key_id,
        aws_secret_access_key=secret_access_key,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )
    return S3Store(root, parsed.netloc, parsed.path, client)


def artifact_store(settings: Settings) -> ArtifactStore:
    """The store that the settings name: S3 for an s3:// `storage_url`, else the folder."""
    url = settings.storage_url
    if not url:
        return ArtifactStore(settings.artifacts)
    if urlparse(url).scheme != "s3" or not urlparse(url).netloc:
        raise ValueError(
            f"SWAV_STORAGE_URL={url!r}: use s3://bucket[/prefix], or leave it unset to keep "
            "artifacts in the artifacts folder only (which may be an NFS mount)"
        )
    secret = settings.s3_secret_access_key
    return _s3_store(
        settings.artifacts,
        url,
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        secret.get_secret_value() if secret else None,
    )
