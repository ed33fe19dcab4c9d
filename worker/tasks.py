"""Celery tasks. Each takes an id, re-reads its row, and does nothing if the row moved on.

`ingest_dataset` extracts and validates an upload (short queue). `run_job` claims a
queued job with a compare-and-set, runs the trainer in a child process, relays its
events into the database, and records how it ended (train queue). `embed_dataset`
embeds a whole dataset with one checkpoint, and `evaluate_checkpoint` stores a
checkpoint's quality report (kNN / linear probe on the labelled dataset); both run on
the short queue, and the relay enqueues the latter for every checkpoint of a job whose
dataset has classes, so training never waits for an evaluation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import update

from api.db import session_scope
from api.models import Checkpoint, Dataset, EmbeddingJob, Job, new_id, utcnow
from api.settings import Settings, get_settings
from api.store import append_event, change_status
from swav_core.data import scan_image_folder
from swav_core.errors import DataError, SwavError
from worker.archive import ArchiveLimits, extract_archive
from worker.celery_app import EMBED_TASK, EVAL_TASK, INGEST_TASK, TRAIN_TASK, app
from worker.dispatch import enqueue_evaluation

log = logging.getLogger(__name__)
MAX_REPORTED_SKIPS = 1000


def dataset_images_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.dataset_dir(dataset_id) / "images"


def _single_top_folder(root: Path) -> Path:
    """Archives often wrap everything in one folder; the classes are the folders below it."""
    entries = [e for e in root.iterdir() if not e.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir():
        return _single_top_folder(entries[0])
    return root


@app.task(name=INGEST_TASK)
def ingest_dataset(dataset_id: str) -> None:
    settings = get_settings()
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        if dataset is None or dataset.status != "validating":
            return
    folder = settings.dataset_dir(dataset_id)
    uploads = sorted(folder.glob("upload.*"))
    staging, images = folder / "images.partial", dataset_images_dir(settings, dataset_id)
    shutil.rmtree(staging, ignore_errors=True)
    limits = ArchiveLimits(
        settings.max_archive_members,
        settings.max_uncompressed_bytes,
        settings.max_compression_ratio,
    )
    try:
        if not uploads:
            raise DataError("the uploaded archive is missing; upload it again")
        report = extract_archive(uploads[0], staging, limits)
        if report.written == 0:
            raise DataError(
                "the archive holds no files"
                + (
                    f" that could be accepted ({len(report.refused)} refused)"
                    if report.refused
                    else ""
                )
            )
        shutil.rmtree(images, ignore_errors=True)
        _single_top_folder(staging).rename(images)
        shutil.rmtree(staging, ignore_errors=True)
        scan = scan_image_folder(images)
    except DataError as error:
        shutil.rmtree(staging, ignore_errors=True)
        with session_scope() as session:
            session.execute(
                update(Dataset)
                .where(Dataset.id == dataset_id)
                .values(status="failed", error_code=error.code, error_message=str(error))
            )
        return
    skipped = report.refused + [{"path": s.path, "reason": s.reason} for s in scan.skipped]
    with session_scope() as session:
        session.execute(
            update(Dataset)
            .where(Dataset.id == dataset_id, Dataset.status == "validating")
            .values(
                status="ready",
                num_images=len(scan.files),
                num_skipped=len(skipped),
                skipped=skipped[:MAX_REPORTED_SKIPS],
                classes=list(scan.classes) if scan.classes else None,
                fingerprint=scan.fingerprint(),
            )
        )


@dataclass
class Relay:
    """Moves the trainer's events.jsonl into the database, throttling metric events."""

    job_id: str
    run_dir: Path
    settings: Settings
    offset: int = 0
    last_metrics_at: float = 0.0
    pending_metrics: dict[str, Any] | None = None
    to_evaluate: list[str] = field(default_factory=list)
    labelled: bool | None = None

    def start_at_end(self) -> None:
        path = self.run_dir / "events.jsonl"
        self.offset = path.stat().st_size if path.exists() else 0

    def poll(self, flush: bool = False) -> None:
        path = self.run_dir / "events.jsonl"
        if path.exists():
            with path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            complete = data[: data.rfind(b"\n") + 1]
            self.offset += len(complete)
            events = [json.loads(line) for line in complete.splitlines() if line.strip()]
            if events:
                with session_scope() as session:
                    for event in events:
                        self._apply(session, event)
                self._enqueue_evaluations()
        if self.pending_metrics and (
            flush or time.monotonic() - self.last_metrics_at >= self.settings.events_metrics_every_s
        ):
            with session_scope() as session:
                append_event(session, self.job_id, "metrics", self.pending_metrics)
            self.pending_metrics = None
            self.last_metrics_at = time.monotonic()

    def _apply(self, session: Any, event: dict[str, Any]) -> None:
        kind = event.pop("type")
        event.pop("time", None)
        if kind == "metrics":
            metrics = {
                k: v for k, v in event.items() if k not in ("step", "total_steps", "epoch", "eta_s")
            }
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    step=event["step"],
                    total_steps=event["total_steps"],
                    epoch=event["epoch"],
                    metrics=metrics,
                    eta_s=event["eta_s"],
                    updated_at=utcnow(),
                )
            )
            self.pending_metrics = event
            return
        if kind == "started":
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(total_steps=event["total_steps"], step=event["step"], epoch=event["epoch"])
            )
        elif kind == "checkpoint":
            path = Path(event["path"]).resolve().relative_to(self.settings.artifacts)
            checkpoint_id = new_id("ckpt")
            session.add(
                Checkpoint(
                    id=checkpoint_id,
                    job_id=self.job_id,
                    step=event["step"],
                    epoch=event["epoch"],
                    final=event["final"],
                    path=str(path),
                    size_bytes=event["size_bytes"],
                    sha256=event["sha256"],
                    metrics={"loss": event.get("loss")},
                )
            )
            session.flush()
            if self._labelled(session):
                self.to_evaluate.append(checkpoint_id)
            self._mark_pruned(session)
            event = {**event, "path": str(path)}
        append_event(session, self.job_id, kind, event)

    def _labelled(self, session: Any) -> bool:
        """Whether the job's dataset has classes (checked once): only then is a quality
        report possible."""
        if self.labelled is None:
            job = session.get(Job, self.job_id)
            dataset = session.get(Dataset, job.dataset_id) if job is not None else None
            self.labelled = bool(dataset is not None and dataset.classes)
        return self.labelled

    def _enqueue_evaluations(self) -> None:
        """After the commit, so the task finds the rows; a broker error loses only a report
        (it can be requested again with POST /v1/checkpoints/{id}/evaluate)."""
        pending, self.to_evaluate = self.to_evaluate, []
        for checkpoint_id in pending:
            try:
                enqueue_evaluation(checkpoint_id)
            except Exception:
                log.warning("could not enqueue the evaluation of %s", checkpoint_id, exc_info=True)

    def _record_checkpoint(self, session: Any, event: dict[str, Any], path: str) -> None:
        """One row per (step, final); a file written again at the same step (a resumed
        run that re-saves it) updates the row."""
        values = {"epoch": event["epoch"], "path": path, "size_bytes": event["size_bytes"],
                  "sha256": event["sha256"], "metrics": {"loss": event.get("loss")},
                  "available": True}
        row = session.query(Checkpoint).filter_by(
            job_id=self.job_id, step=event["step"], final=event["final"]).one_or_none()
        if row is None:
            session.add(Checkpoint(id=new_id("ckpt"), job_id=self.job_id, step=event["step"],
                                   final=event["final"], **values))
        else:
            for key, value in values.items():
                setattr(row, key, value)
        session.flush()

    def _mark_pruned(self, session: Any) -> None:
        rows = session.query(Checkpoint).filter(
            Checkpoint.job_id == self.job_id, Checkpoint.available.is_(True)
        )
        for row in rows:
            if not (self.settings.artifacts / row.path).exists():
                row.available = False


def _start_child(run_dir: Path) -> subprocess.Popen[bytes]:
    log_file = (run_dir / "train.log").open("ab")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # see swav_core/cli.py
    return subprocess.Popen(
        [sys.executable, "-m", "worker.train_child", str(run_dir)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@app.task(name=TRAIN_TASK)
def run_job(job_id: str) -> None:
    settings = get_settings()
    owner = f"{socket.gethostname()}:{os.getpid()}"
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return  # a duplicate delivery, or cancelled while queued
        claimed = change_status(
            session,
            job_id,
            "running",
            expected=("queued",),
            attempt=job.attempt + 1,
            started_at=job.started_at or utcnow(),
            lease_owner=owner,
            fencing_token=job.fencing_token + 1,
        )
        if not claimed:
            return
        config, dataset_id = job.config, job.dataset_id

    run_dir = settings.job_dir(job_id) / "run"
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "STOP").unlink(missing_ok=True)
    (run_dir / "outcome.json").unlink(missing_ok=True)
    spec = {"config": config, "data_dir": str(dataset_images_dir(settings, dataset_id))}
    (run_dir / "job.json").write_text(json.dumps(spec))

    relay = Relay(job_id, run_dir, settings)
    relay.start_at_end()
    started = time.monotonic()
    child = _start_child(run_dir)
    cancel_at: float | None = None
    try:
        while child.poll() is None:
            time.sleep(settings.poll_interval_s)
            relay.poll()
            with session_scope() as session:
                status = session.get(Job, job_id).status  # type: ignore[union-attr]
            if status == "cancelling" and cancel_at is None:
                (run_dir / "STOP").touch()
                cancel_at = time.monotonic()
            if cancel_at is not None and time.monotonic() - cancel_at > settings.cancel_grace_s:
                _kill_group(child, signal.SIGKILL)
    finally:
        if child.poll() is None:
            _kill_group(child, signal.SIGKILL)
            child.wait()
    relay.poll(flush=True)
    _finish(job_id, run_dir, child.returncode, time.monotonic() - started, cancel_at is not None)


def _finish(job_id: str, run_dir: Path, returncode: int, seconds: float, cancelled: bool) -> None:
    outcome_path = run_dir / "outcome.json"
    outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else None
    with session_scope() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(compute_seconds=Job.compute_seconds + seconds, lease_owner=None)
        )
        if outcome is not None and outcome["status"] == "completed":
            change_status(session, job_id, "succeeded", eta_s=0.0)
        elif outcome is not None and outcome["status"] == "stopped" and cancelled:
            change_status(session, job_id, "cancelled")
        elif outcome is not None and outcome["status"] == "failed":
            error = outcome["error"]
            change_status(
                session, job_id, "failed", error_code=error["code"], error_message=error["message"]
            )
        elif cancelled:
            change_status(session, job_id, "cancelled")
        else:
            change_status(
                session,
                job_id,
                "failed",
                error_code="internal",
                error_message=f"the training process exited with code {returncode} "
                "without a result; see train.log",
            )


# --------------------------------------------------------------------------- embeddings

EMBED_CHUNK = 256
EMBEDDINGS_FILE = "embeddings.npy"
INDEX_FILE = "index.json"


def embeddings_dir(settings: Settings, embedding_job_id: str) -> Path:
    return settings.artifacts / "embeddings" / embedding_job_id


def _finish_embedding(embedding_job_id: str, status: str, **values: Any) -> None:
    with session_scope() as session:
        session.execute(
            update(EmbeddingJob)
            .where(EmbeddingJob.id == embedding_job_id, EmbeddingJob.status == "running")
            .values(status=status, finished_at=utcnow(), updated_at=utcnow(), **values)
        )


def _write_atomically(path: Path, write: Any) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temp.open("wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def compute_embeddings(
    checkpoint: Path, images_dir: Path, layer: Any, normalize: bool
) -> tuple[Any, list[str]]:
    """(N x D float32 array, the N relative paths) for every valid image under `images_dir`,
    in `scan_image_folder(images_dir).files` order (sorted relative POSIX paths)."""
    import numpy as np
    import torch

    from swav_core.checkpoint import load_model
    from swav_core.data import load_rgb
    from swav_core.embed import embed

    model, config = load_model(checkpoint)
    scan = scan_image_folder(images_dir)
    files = list(scan.files)
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(files), EMBED_CHUNK):
            images = [load_rgb(images_dir / name) for name in files[start : start + EMBED_CHUNK]]
            rows = embed(model, images, layer, normalize, batch_size=EMBED_CHUNK,
                         size=config.size_crops[0])
            chunks.append(rows.cpu().numpy().astype(np.float32))
    return np.concatenate(chunks), files


@app.task(name=EMBED_TASK)
def embed_dataset(embedding_job_id: str) -> None:
    settings = get_settings()
    with session_scope() as session:
        row = session.get(EmbeddingJob, embedding_job_id)
        if row is None or row.status != "queued":
            return  # a duplicate delivery
        claimed = session.execute(
            update(EmbeddingJob)
            .where(EmbeddingJob.id == embedding_job_id, EmbeddingJob.status == "queued")
            .values(status="running", updated_at=utcnow())
        )
        if claimed.rowcount != 1:  # type: ignore[attr-defined]
            return
        checkpoint = session.get(Checkpoint, row.checkpoint_id)
        layer, normalize, dataset_id = row.layer, row.normalize, row.dataset_id
        checkpoint_path = settings.artifacts / checkpoint.path if checkpoint else None
    if checkpoint_path is None or not checkpoint_path.is_file():
        _finish_embedding(
            embedding_job_id, "failed", error_code="checkpoint_gone",
            error_message="the checkpoint is no longer on disk (pruned or removed); "
            "use a newer checkpoint of the job",
        )
        return
    import numpy as np

    try:
        matrix, files = compute_embeddings(
            checkpoint_path, dataset_images_dir(settings, dataset_id), layer, normalize
        )
        folder = embeddings_dir(settings, embedding_job_id)
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomically(folder / INDEX_FILE, lambda f: f.write(json.dumps(files).encode()))
        _write_atomically(folder / EMBEDDINGS_FILE, lambda f: np.save(f, matrix))
    except SwavError as error:
        _finish_embedding(
            embedding_job_id, "failed", error_code=error.code, error_message=str(error)
        )
        return
    except Exception as error:
        log.exception("embedding job %s failed", embedding_job_id)
        _finish_embedding(
            embedding_job_id, "failed", error_code="internal",
            error_message=f"the embedding failed ({type(error).__name__}); see the worker log",
        )
        return
    _finish_embedding(
        embedding_job_id, "succeeded", num_rows=int(matrix.shape[0]),
        path=str(folder.relative_to(settings.artifacts)),
    )


# --------------------------------------------------------------------------- quality


@app.task(name=EVAL_TASK)
def evaluate_checkpoint(checkpoint_id: str) -> None:
    """Store kNN and linear-probe top-1 of the checkpoint's backbone on its job's dataset.

    Leaves `quality` unset (and logs why) when the file is gone or the dataset has no
    classes; the evaluation does not change the model or the dataset.
    """
    settings = get_settings()
    with session_scope() as session:
        checkpoint = session.get(Checkpoint, checkpoint_id)
        job = session.get(Job, checkpoint.job_id) if checkpoint is not None else None
        if checkpoint is None or job is None:
            return
        path = settings.artifacts / checkpoint.path
        images = dataset_images_dir(settings, job.dataset_id)
    from swav_core.checkpoint import load_model
    from swav_core.evaluate import evaluate_model

    try:
        model, config = load_model(path)
        report = evaluate_model(model, images, size=config.size_crops[0])
    except SwavError as error:
        log.warning("checkpoint %s not evaluated: %s", checkpoint_id, error)
        return
    quality = {key: report[key] for key in ("knn_top1", "linear_top1", "n_train", "n_val")}
    with session_scope() as session:
        session.execute(
            update(Checkpoint).where(Checkpoint.id == checkpoint_id).values(quality=quality)
        )
