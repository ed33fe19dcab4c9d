"""Celery tasks. Each takes an id, re-reads its row, and does nothing if the row moved on.

`ingest_dataset` extracts and validates an upload (and writes its prepared copy,
swav_service/prepared_copy.py), `embed_dataset` embeds a whole dataset
with one checkpoint, and `evaluate_checkpoint` stores a checkpoint's quality report (kNN /
linear probe on the labelled dataset); these run on the short queue, each under a claim
on its row (worker/short_lease.py) that the reconciler repairs when its worker is lost.
The relay enqueues an evaluation for every checkpoint of a job whose dataset has classes,
so training never waits for one. `run_job` trains a job under a lease (worker/runner.py:
claim, heartbeat, relay, end state; train queue).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from swav_core.atomic import atomic_write_bytes, atomic_writer
from swav_core.errors import DataError, SwavError
from swav_core.image_folder import NoImagesError, SkippedFile, scan_image_folder
from swav_core.recipe import DatasetStats
from swav_service import quota
from swav_service.db import session_scope
from swav_service.dispatch import EMBED_TASK, EVAL_TASK, INGEST_TASK, TRAIN_TASK
from swav_service.layout import (
    EMBEDDINGS_FILE,
    INDEX_FILE,
    dataset_images_dir,
    dataset_prepared_dir,
    embeddings_dir,
    job_run_dir,
)
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, Job, utcnow
from swav_service.prepared_copy import prepare_dataset
from swav_service.quota import StorageLimitExceeded
from swav_service.settings import Settings, get_settings
from swav_service.storage import StorageError, artifact_store
from worker import celery_app
from worker.archive import extract_archive
from worker.archive_caps import ArchiveLimits, ArchiveRefused
from worker.archive_names import shown_name
from worker.celery_app import app
from worker.gang import run_node
from worker.ranks import is_multi_node
from worker.runner import run_single_node
from worker.short_lease import EMBEDDING, EVALUATION, INGESTION, ShortClaim, short_claim

log = logging.getLogger(__name__)
MAX_REPORTED_SKIPS = 1000


def _single_top_folder(root: Path) -> Path:
    """Archives often wrap everything in one folder; the classes are the folders below it."""
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return _single_top_folder(entries[0])
    return root


def _in_archive(skipped: tuple[SkippedFile, ...], prefix: str) -> list[dict[str, str]]:
    """Skipped files named as the archive names them (the unwrapped top folders put back)."""
    return [
        {"path": shown_name(f"{prefix}/{s.path}" if prefix else s.path), "reason": s.reason}
        for s in skipped
    ]


def _end_validation(
    claim: ShortClaim, status: str, skipped: list[dict[str, str]], **values: Any
) -> None:
    """Move the claimed validating dataset to `status` with its skipped files (the first
    MAX_REPORTED_SKIPS of them) and `values`; a deleted dataset, or one whose claim was
    given to another worker, is left alone."""
    with session_scope() as session:
        claim.finish(
            session,
            status=status,
            num_skipped=len(skipped),
            skipped=skipped[:MAX_REPORTED_SKIPS],
            **values,
        )


def _fail_dataset(
    claim: ShortClaim, code: str, message: str, skipped: list[dict[str, str]]
) -> None:
    _end_validation(
        claim, "failed", skipped, error_code=code, error_message=message, images_bytes=0
    )


def _count_images(dataset_id: str, settings: Settings, nbytes: int) -> str | None:
    """Record the dataset's extracted images as stored bytes, unless they take its tenant
    past the limit: then why not (the message for the dataset's error)."""
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None:
            return None
        what = f"the dataset's {quota.human_bytes(nbytes)} of extracted images"
        return quota.record_dataset_bytes(session, settings, dataset, nbytes, what)


@app.task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    """Extract and validate an upload: the dataset ends `ready` or `failed`, never stuck.

    `skipped` lists every refused member and every skipped file, named as in the archive,
    with the reason, whether the dataset ends ready or failed; error messages name members
    and caps, never a server path. Everything is written under the dataset's folder.
    """
    settings = get_settings()
    with short_claim(INGESTION, dataset_id, settings) as claim:
        if claim is not None:  # None: a duplicate delivery, or the dataset moved on
            _ingest(settings, claim, dataset_id)


def _ingest(settings: Settings, claim: ShortClaim, dataset_id: str) -> None:
    """Idempotent: a run after a lost one starts from the upload again (the staging,
    images and prepared folders are replaced, the artifact store's copy overwritten)."""
    folder = settings.dataset_dir(dataset_id)
    uploads = sorted(folder.glob("upload.*"))
    staging, images = folder / "images.partial", dataset_images_dir(settings, dataset_id)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(dataset_prepared_dir(settings, dataset_id), ignore_errors=True)
    limits = ArchiveLimits(
        settings.max_archive_members,
        settings.max_uncompressed_bytes,
        settings.max_compression_ratio,
    )
    refused: list[dict[str, str]] = []
    prefix = ""
    try:
        if not uploads:
            raise DataError("the uploaded archive is missing; upload it again")
        report = extract_archive(uploads[0], staging, limits)
        refused = report.refused
        if report.written == 0:
            raise DataError(
                "the archive holds no files"
                + (
                    f" that could be accepted ({len(report.refused)} refused, see `skipped`)"
                    if report.refused
                    else ""
                )
            )
        top = _single_top_folder(staging)
        prefix = "" if top == staging else top.relative_to(staging).as_posix()
        shutil.rmtree(images, ignore_errors=True)
        top.rename(images)
        shutil.rmtree(staging, ignore_errors=True)
        scan = scan_image_folder(images, max_pixels=settings.max_dataset_image_pixels)
    except DataError as error:
        if isinstance(error, ArchiveRefused):
            refused = error.refused
        skipped = refused + (
            _in_archive(error.skipped, prefix) if isinstance(error, NoImagesError) else []
        )
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
        _fail_dataset(claim, error.code, str(error), skipped)
        return
    except Exception:
        log.exception("ingesting dataset %s failed", dataset_id)
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(images, ignore_errors=True)
        _fail_dataset(
            claim,
            "ingest_failed",
            "the archive could not be processed (a server-side error); upload it again later",
            refused,
        )
        return
    skipped = refused + _in_archive(scan.skipped, prefix)
    refusal = _count_images(dataset_id, settings, quota.folder_bytes(images))
    if refusal is not None:
        shutil.rmtree(images, ignore_errors=True)
        _fail_dataset(claim, StorageLimitExceeded.code, refusal, skipped)
        return
    try:  # with an S3 store, workers on other machines restore the images from it
        artifact_store(settings).upload_tree(images)
    except StorageError:
        log.exception("uploading dataset %s to the artifact store failed", dataset_id)
        _fail_dataset(
            claim,
            "ingest_failed",
            "the images could not be stored (the artifact store is unreachable); upload again",
            skipped,
        )
        return
    prepare_dataset(settings, dataset_id, scan)  # without it, training decodes the images
    _end_validation(
        claim,
        "ready",
        skipped,
        num_images=len(scan.files),
        classes=list(scan.classes) if scan.classes else None,
        fingerprint=scan.fingerprint(),
        stats=DatasetStats.from_scan(scan).as_dict(),
    )


@app.task(name=TRAIN_TASK)
def run_job(job_id: str) -> None:
    """Train the job under a lease (worker/runner.py), or one node of it (worker/gang.py);
    a duplicate delivery does nothing."""
    supervisor = celery_app.SUPERVISOR
    if supervisor is not None:
        supervisor.current_job = job_id
    try:
        settings = get_settings()
        if is_multi_node(job_id):
            run_node(job_id, settings)
        else:
            run_single_node(job_id, settings)
    finally:
        if supervisor is not None:
            supervisor.current_job = None


# --------------------------------------------------------------------------- embeddings

def _finish_embedding(claim: ShortClaim, status: str, **values: Any) -> None:
    """End the claimed running embedding job (nothing if the claim went to another worker)."""
    with session_scope() as session:
        claim.finish(session, status=status, finished_at=utcnow(), updated_at=utcnow(), **values)


def compute_embeddings(
    checkpoint: Path, images_dir: Path, layer: Any, normalize: bool
) -> tuple[Any, list[str]]:
    """(N x D float32 array, the N relative paths) for every valid image under `images_dir`,
    in `scan_image_folder(images_dir).files` order (sorted relative POSIX paths), read in
    batches by a pixel budget (`swav_core.embed.embed_files`)."""
    import numpy as np
    import torch

    from swav_core.embed import embed_files
    from swav_core.exports import load_model

    model, config = load_model(checkpoint)
    files = list(scan_image_folder(images_dir).files)
    with torch.inference_mode():
        rows = embed_files(model, [images_dir / name for name in files], layer, normalize,
                           size=config.size_crops[0])
    return rows.cpu().numpy().astype(np.float32), files


@app.task(name=EMBED_TASK)
def embed_dataset(embedding_job_id: str) -> None:
    """Embed every valid image of the job's dataset; the job ends `succeeded` or `failed`.
    Idempotent: a run after a lost one writes the same files again, atomically."""
    settings = get_settings()
    with short_claim(EMBEDDING, embedding_job_id, settings) as claim:
        if claim is not None:  # None: a duplicate delivery, or the job moved on
            _embed(settings, claim, embedding_job_id)


def _embed(settings: Settings, claim: ShortClaim, embedding_job_id: str) -> None:
    with session_scope() as session:
        row = session.get(EmbeddingJob, embedding_job_id)
        if row is None:  # deleted since the claim (with its job or checkpoint)
            return
        checkpoint = session.get(Checkpoint, row.checkpoint_id)
        layer, normalize, dataset_id = row.layer, row.normalize, row.dataset_id
        checkpoint_path = settings.artifacts / checkpoint.path if checkpoint else None
    store = artifact_store(settings)
    if checkpoint_path is None or not store.fetch(checkpoint_path):
        _finish_embedding(
            claim, "failed", error_code="checkpoint_gone",
            error_message="the checkpoint is no longer on disk (pruned or removed); "
            "use a newer checkpoint of the job",
        )
        return
    import numpy as np

    try:
        images = dataset_images_dir(settings, dataset_id)
        if not images.is_dir():
            store.restore(images)
        matrix, files = compute_embeddings(checkpoint_path, images, layer, normalize)
        folder = embeddings_dir(settings, embedding_job_id)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / INDEX_FILE, json.dumps(files).encode())
        with atomic_writer(folder / EMBEDDINGS_FILE) as file:
            np.save(file, matrix)
    except SwavError as error:
        _finish_embedding(
            claim, "failed", error_code=error.code, error_message=str(error)
        )
        return
    except Exception as error:
        log.exception("embedding job %s failed", embedding_job_id)
        _finish_embedding(
            claim, "failed", error_code="internal",
            error_message=f"the embedding failed ({type(error).__name__}); see the worker log",
        )
        return
    _finish_embedding(
        claim, "succeeded", num_rows=int(matrix.shape[0]),
        path=str(folder.relative_to(settings.artifacts)), size_bytes=quota.folder_bytes(folder),
    )


# --------------------------------------------------------------------------- quality


@app.task(name=EVAL_TASK)
def evaluate_checkpoint(checkpoint_id: str) -> None:
    """Store kNN and linear-probe top-1 of the checkpoint's backbone on its job's dataset.

    When the report cannot be computed (the file is gone, the data does not allow it),
    `evaluation_error` on the checkpoint says why; the evaluation does not change the
    model or the dataset. Done or given up, the checkpoint may be evaluated again.
    """
    settings = get_settings()
    with short_claim(EVALUATION, checkpoint_id, settings) as claim:
        if claim is None:  # a duplicate delivery, or nothing requested
            return
        error: dict[str, str] | None = {
            "code": "internal", "message": "the evaluation failed; see the worker log",
        }
        try:
            error = _evaluate(settings, claim, checkpoint_id)
        finally:
            with session_scope() as session:
                claim.finish(session, evaluation_requested_at=None, evaluation_error=error)


def _evaluate(settings: Settings, claim: ShortClaim, checkpoint_id: str) -> dict[str, str] | None:
    """Compute and store the report; the reason it could not be, or None."""
    from swav_core.evaluate import evaluate_model
    from swav_core.exports import load_model

    with session_scope() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        job = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
        if checkpoint is None or job is None:
            return None
        path = settings.artifacts / checkpoint.path
        images = dataset_images_dir(settings, job.dataset_id)
        job_id, keep_best_by = job.id, job.keep_best_by
    try:
        store = artifact_store(settings)
        if not images.is_dir():
            store.restore(images)
        if not store.fetch(path):
            log.warning("checkpoint %s not evaluated: its file is gone", checkpoint_id)
            return {"code": "checkpoint_gone", "message": "the checkpoint's file is gone "
                    "(pruned or removed); evaluate a newer checkpoint"}
        model, config = load_model(path)
        report = evaluate_model(model, images, size=config.size_crops[0])
    except SwavError as error:
        log.warning("checkpoint %s not evaluated: %s", checkpoint_id, error)
        return {"code": error.code, "message": str(error)}
    quality = {key: report[key] for key in ("knn_top1", "linear_top1", "n_train", "n_val")}
    with session_scope() as session:
        # The job row first, as the relay locks it before its checkpoints: no deadlock.
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        if not claim.holds(session):
            return None  # given to another worker: its report is the one kept
        session.execute(
            update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(quality=quality)
        )
        if keep_best_by:
            keep_best_checkpoint(session, settings, job_id)
    return None


def keep_best_checkpoint(session: Any, settings: Settings, job_id: str) -> None:
    """Flag and pin the job's checkpoint with the highest `keep_best_by` metric.

    Among evaluated checkpoints still on disk (a later step wins a tie), the best one is
    pinned so that the trainer's pruning keeps it; the previous best is unpinned and
    pruned like any other once past `keep_last`. The job row is locked so that concurrent
    evaluations of one job agree on the result.
    """
    from swav_core.checkpoint import prune_checkpoints, set_pinned

    job = session.execute(select(Job).where(Job.id == job_id).with_for_update()).scalar_one()
    metric = job.keep_best_by
    rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id)).all()
    on_disk = [r for r in rows if r.available and (settings.artifacts / r.path).exists()]
    scored = [r for r in on_disk if r.quality and r.quality.get(metric) is not None]
    if not scored:
        return
    best = max(scored, key=lambda r: (r.quality[metric], r.step))
    for row in rows:
        row.best = row.id == best.id
        if not row.final and row in on_disk:
            set_pinned(settings.artifacts / row.path, row.best)
    from worker.relay import mark_pruned

    run_dir = job_run_dir(settings, job_id)
    prune_checkpoints(run_dir, int(job.config.get("keep_last", 1)))
    mark_pruned(session, settings, job_id)
