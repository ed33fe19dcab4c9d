"""Moving the trainer's events into the database, under the lease.

The training child appends events to events.jsonl; the relay stores them (job progress,
the event log, checkpoint rows, their evaluation) and, with a remote artifact store,
uploads each checkpoint before recording it.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from swav_core.checkpoint_names import sidecar_path
from swav_service import quota
from swav_service.db import session_scope
from swav_service.dispatch import enqueue_evaluation
from swav_service.job_state import append_event, append_warning, evaluation_request
from swav_service.models import Checkpoint, Dataset, Job, new_id, utcnow
from swav_service.settings import Settings
from swav_service.storage import ArtifactStore, StorageError
from worker.lease import Lease

log = logging.getLogger(__name__)



@dataclass
class Relay:
    """Moves the trainer's events.jsonl into the database under the lease.

    The read offset advances only after the transaction that stored the events commits,
    so a database outage delays events but loses none. Metric events update the job row
    every time and enter the event log at most every `events_metrics_every_s`; the log is
    capped at `max_events_per_job` by thinning them, and a repeated warning is counted on
    its first event (swav_service/job_state.py).

    With a remote artifact store (swav_service/storage.py), a checkpoint event waits, and
    the events after it, until its files are uploaded (in a thread, so the lease is
    renewed meanwhile): a recorded checkpoint can be downloaded from any machine.
    """

    lease: Lease
    run_dir: Path
    settings: Settings
    offset: int = 0
    last_metrics_at: float = float("-inf")  # the first metrics event is always logged
    pending_metrics: dict[str, Any] | None = None
    labelled: bool | None = None
    store: ArtifactStore | None = None
    uploads: dict[str, Future[None]] = field(default_factory=dict)
    uploaded: set[str] = field(default_factory=set)
    upload_failures: Counter[str] = field(default_factory=Counter)
    pruned: list[Path] = field(default_factory=list)
    # Set when a checkpoint took the tenant past its stored-bytes limit: why (the runner
    # stops the run and fails the job with it).
    storage_refusal: str | None = None
    _uploader: ThreadPoolExecutor | None = None

    @property
    def job_id(self) -> str:
        return self.lease.job_id

    def start_at_end(self) -> None:
        path = self.run_dir / "events.jsonl"
        self.offset = path.stat().st_size if path.exists() else 0

    def poll(self, flush: bool = False) -> None:
        path = self.run_dir / "events.jsonl"
        to_evaluate: list[str] = []
        if path.exists():
            with path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
            complete = self._uploaded_prefix(data[: data.rfind(b"\n") + 1], wait=flush)
            events = [json.loads(line) for line in complete.splitlines() if line.strip()]
            if events:
                checkpointed = [e["step"] for e in events if e.get("type") == "checkpoint"]
                with session_scope() as session:
                    job = self.lease.guard(session)
                    for event in events:
                        self._apply(session, event, to_evaluate)
                    if checkpointed and self.storage_refusal is None:
                        self.storage_refusal = self._over_quota(session, job, checkpointed[-1])
            self.offset += len(complete)
        for checkpoint_id in to_evaluate:
            self._enqueue_evaluation(checkpoint_id)
        self._delete_pruned()
        if self.pending_metrics and (
            flush or time.monotonic() - self.last_metrics_at >= self.settings.events_metrics_every_s
        ):
            with session_scope() as session:
                self.lease.guard(session)
                append_event(session, self.job_id, "metrics", self.pending_metrics,
                             self.settings.max_events_per_job)
            self.pending_metrics = None
            self.last_metrics_at = time.monotonic()

    def _uploaded_prefix(self, complete: bytes, wait: bool) -> bytes:
        """The events up to the first checkpoint whose upload is not done (started now)."""
        if self.store is None or not self.store.remote:
            return complete
        end = 0
        for line in complete.splitlines(keepends=True):
            if b'"checkpoint"' in line:
                event = json.loads(line)
                if event.get("type") == "checkpoint" and not self._uploaded(event["path"], wait):
                    return complete[:end]
            end += len(line)
        return complete

    def _uploaded(self, name: str, wait: bool) -> bool:
        """Whether the checkpoint's upload is done; starts it if not. A checkpoint pruned
        before its upload counts as done (its row is then marked unavailable); one whose
        upload failed 3 times too, with an error in the log, so that the run goes on."""
        while name not in self.uploaded:
            if name not in self.uploads:
                if self._uploader is None:
                    self._uploader = ThreadPoolExecutor(1, thread_name_prefix="swav-upload")
                self.uploads[name] = self._uploader.submit(self._upload, Path(name))
            future = self.uploads[name]
            if wait:
                future.exception()  # blocks until it is done
            if not future.done():
                return False
            del self.uploads[name]
            error = future.exception()
            if error is not None and not isinstance(error, FileNotFoundError):
                self.upload_failures[name] += 1
                if self.upload_failures[name] < 3:
                    log.warning("job %s: upload of %s failed (%s); retrying", self.job_id,
                                Path(name).name, error)
                    continue
                log.error("job %s: %s not uploaded to the artifact store: %s", self.job_id,
                          Path(name).name, error)
            self.uploaded.add(name)
        return True

    def _upload(self, path: Path) -> None:
        if self.store is not None:
            self.store.upload(sidecar_path(path))  # first, as the trainer commits them
            self.store.upload(path)

    def _delete_pruned(self) -> None:
        """Remove the store's copies of checkpoints the trainer pruned (after the commit)."""
        while self.pruned and self.store is not None:
            path = self.pruned.pop()
            try:
                self.store.delete(sidecar_path(path))
                self.store.delete(path)
            except StorageError as error:
                log.warning("job %s: %s", self.job_id, error)

    def close(self) -> None:
        if self._uploader is not None:
            self._uploader.shutdown(wait=False, cancel_futures=True)

    def _apply(self, session: Session, event: dict[str, Any], to_evaluate: list[str]) -> None:
        kind = event.pop("type")
        event.pop("time", None)
        if kind == "metrics":
            skip = ("step", "total_steps", "epoch", "eta_s")
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(
                    step=event["step"],
                    total_steps=event["total_steps"],
                    epoch=event["epoch"],
                    metrics={k: v for k, v in event.items() if k not in skip},
                    eta_s=event["eta_s"],
                    updated_at=utcnow(),
                )
            )
            self.pending_metrics = event
            return
        if kind in ("started", "resumed"):
            values = {"step": event["step"], "epoch": event["epoch"]}
            if event.get("total_steps") is not None:
                values["total_steps"] = event["total_steps"]
            session.execute(update(Job).where(Job.id == self.job_id).values(**values))
        elif kind in ("budget_fitted", "budget_refitted"):  # the budget fixed the length
            session.execute(
                update(Job)
                .where(Job.id == self.job_id)
                .values(total_steps=event["total_steps"], epochs=event["epochs"])
            )
        elif kind == "checkpoint":
            path = str(Path(event["path"]).resolve().relative_to(self.settings.artifacts))
            checkpoint_id = self._record_checkpoint(session, event, path)
            if self._labelled(session):
                to_evaluate.append(checkpoint_id)  # one report in flight (api/limits.py)
                session.execute(
                    update(Checkpoint)
                    .where(Checkpoint.id == checkpoint_id)
                    .values(**evaluation_request())
                )
            self._mark_pruned(session)
            event = {**event, "path": path, "checkpoint_id": checkpoint_id}
        if kind == "warning":
            append_warning(session, self.job_id, event, self.settings.max_events_per_job)
            return
        append_event(session, self.job_id, kind, event, self.settings.max_events_per_job)

    def _over_quota(self, session: Session, job: Job, step: int) -> str | None:
        """Why the job must stop, if its checkpoints (counted with the ones just recorded)
        take the tenant past its stored-bytes limit."""
        used = quota.over_limit(session, self.settings, job.tenant)
        if used is None:
            return None
        return (
            f"the checkpoint of step {step} took the tenant past its storage limit, so the "
            f"job was stopped and its last checkpoint kept: "
            f"{quota.storage_message(used.total, self.settings.tenant_max_stored_bytes)}"
        )

    def _record_checkpoint(self, session: Session, event: dict[str, Any], path: str) -> str:
        """One row per (step, final): a file saved again at the same step (a resumed run
        that re-saves it) updates its row. Returns the row's id."""
        sidecar = sidecar_path(Path(event["path"]))
        values = {
            "epoch": event["epoch"],
            "path": path,
            "size_bytes": event["size_bytes"],
            "extra_bytes": sidecar.stat().st_size if sidecar.is_file() else 0,
            "sha256": event["sha256"],
            "metrics": {"loss": event.get("loss")},
            "available": True,
            "quality": None,
        }
        row = session.execute(
            select(Checkpoint).where(
                Checkpoint.job_id == self.job_id,
                Checkpoint.step == event["step"],
                Checkpoint.final == event["final"],
            )
        ).scalar_one_or_none()
        if row is None:
            row = Checkpoint(
                id=new_id("ckpt"), job_id=self.job_id, step=event["step"], final=event["final"]
            )
            session.add(row)
        for key, value in values.items():
            setattr(row, key, value)
        session.flush()
        return row.id

    def _labelled(self, session: Session) -> bool:
        """Whether the job's dataset has classes (checked once): only then can a quality
        report be computed."""
        if self.labelled is None:
            job = session.get(Job, self.job_id)
            dataset = session.get(Dataset, job.dataset_id) if job is not None else None
            self.labelled = bool(dataset is not None and dataset.classes)
        return self.labelled

    def _enqueue_evaluation(self, checkpoint_id: str) -> None:
        """After the commit, so the task finds the row; a broker error loses only a report
        (it can be requested again with POST /v1/checkpoints/{id}/evaluate)."""
        try:
            enqueue_evaluation(checkpoint_id)
        except Exception:
            log.warning("could not enqueue the evaluation of %s", checkpoint_id, exc_info=True)

    def _mark_pruned(self, session: Session) -> None:
        for path in mark_pruned(session, self.settings, self.job_id):
            if self.store is not None and self.store.remote:
                self.pruned.append(path)


def mark_pruned(session: Session, settings: Settings, job_id: str) -> list[Path]:
    """Flag the job's checkpoint rows whose file is gone from disk as unavailable; their
    paths (the files the trainer or keep-best pruned)."""
    gone = []
    rows = session.scalars(
        select(Checkpoint).where(Checkpoint.job_id == job_id, Checkpoint.available.is_(True))
    )
    for row in rows:
        path = settings.artifacts / row.path
        if not path.exists():
            row.available = False
            gone.append(path)
    return gone

