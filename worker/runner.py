"""Running one training job under a lease: claim, heartbeat, relay, hand back or finish.

A runner claims a queued job with a compare-and-set that bumps the job's fencing token
and sets a lease (owner, expiry). It then starts the training child process and, while
the child runs, renews the lease and relays the child's events into the database. Every
write it makes (events, checkpoints, progress, the final state) first locks the job row
and checks that the token is still its own, so a runner whose lease was taken over (a
duplicate delivery, a worker that was presumed dead) cannot write anything.

A runner that cannot renew (the database is unreachable) stops its child before the
lease would expire, so by the time the reconciler hands the job to another worker,
nobody trains it any more. A worker told to shut down (SIGTERM) asks the child to
checkpoint and gives the job back to the queue without using up an attempt.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from swav_service.db import session_scope
from swav_service.dispatch import enqueue_evaluation, enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.layout import dataset_images_dir, job_run_dir, sidecar
from swav_service.models import Checkpoint, Dataset, Job, new_id, utcnow
from swav_service.settings import Settings
from swav_service.storage import ArtifactStore, StorageError, artifact_store
from worker.launch import NodeLaunch, child_command, die_with_parent

if TYPE_CHECKING:
    from worker.gang import GangMonitor

log = logging.getLogger(__name__)

SHUTDOWN = threading.Event()
"""Set when the worker is asked to stop (SIGTERM): the running job goes back to the queue."""

NOT_RETRIED = frozenset(
    {
        "invalid_config",
        "invalid_data",
        "non_finite_loss",
        "out_of_memory",
        "checkpoint_failed",
        "collapsed",
    }
)


class LeaseLost(Exception):
    """The job's fencing token is no longer this runner's: another runner owns it."""


def runner_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident()}"


@dataclass
class Lease:
    """This runner's claim on a job: every write goes through `guard`."""

    job_id: str
    owner: str
    token: int
    ttl_s: float
    renewed_at: float = field(default_factory=time.monotonic)

    def guard(self, session: Session) -> Job:
        """Lock the job row if the token is still ours (raise LeaseLost otherwise)."""
        job = session.execute(
            select(Job)
            .where(Job.id == self.job_id, Job.fencing_token == self.token)
            .with_for_update()
        ).scalar_one_or_none()
        if job is None:
            raise LeaseLost(self.job_id)
        return job

    def renew(self) -> str:
        """Extend the lease; the job's status (e.g. "cancelling"). Raises LeaseLost, or a
        database error when the database is unreachable (the lease is then not renewed)."""
        started = time.monotonic()
        with session_scope() as session:
            status = session.execute(
                update(Job)
                .where(
                    Job.id == self.job_id,
                    Job.fencing_token == self.token,
                    Job.status.in_(("running", "cancelling")),
                )
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.ttl_s))
                .returning(Job.status)
            ).scalar_one_or_none()
        if status is None:
            raise LeaseLost(self.job_id)
        self.renewed_at = started
        return status

    def remaining_s(self) -> float:
        """Seconds until the lease expires as far as this runner knows (it may be less)."""
        return self.ttl_s - (time.monotonic() - self.renewed_at)


def claim(job_id: str, settings: Settings) -> tuple[Lease, Job] | None:
    """Take a queued job (compare-and-set on its status); None if it is not queued."""
    owner = runner_name()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.status != "queued":
            return None
        token = job.fencing_token + 1
        claimed = change_status(
            session,
            job_id,
            "running",
            expected=("queued",),
            attempt=job.attempt + 1,
            started_at=job.started_at or utcnow(),
            lease_owner=owner,
            lease_expires_at=utcnow() + timedelta(seconds=settings.lease_ttl_s),
            fencing_token=token,
        )
        if not claimed:
            return None
        session.refresh(job)
        session.expunge(job)
    return Lease(job_id, owner, token, settings.lease_ttl_s), job


@dataclass
class Relay:
    """Moves the trainer's events.jsonl into the database under the lease.

    The read offset advances only after the transaction that stored the events commits,
    so a database outage delays events but loses none. Metric events update the job row
    every time and enter the event log at most every `events_metrics_every_s`.

    With a remote artifact store (swav_service/storage.py), a checkpoint event waits, and
    the events after it, until its files are uploaded (in a thread, so the lease is
    renewed meanwhile): a recorded checkpoint can be downloaded from any machine.
    """

    lease: Lease
    run_dir: Path
    settings: Settings
    offset: int = 0
    last_metrics_at: float = 0.0
    pending_metrics: dict[str, Any] | None = None
    labelled: bool | None = None
    store: ArtifactStore | None = None
    uploads: dict[str, Future[None]] = field(default_factory=dict)
    uploaded: set[str] = field(default_factory=set)
    upload_failures: Counter[str] = field(default_factory=Counter)
    pruned: list[Path] = field(default_factory=list)
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
                with session_scope() as session:
                    self.lease.guard(session)
                    for event in events:
                        self._apply(session, event, to_evaluate)
            self.offset += len(complete)
        for checkpoint_id in to_evaluate:
            self._enqueue_evaluation(checkpoint_id)
        self._delete_pruned()
        if self.pending_metrics and (
            flush or time.monotonic() - self.last_metrics_at >= self.settings.events_metrics_every_s
        ):
            with session_scope() as session:
                self.lease.guard(session)
                append_event(session, self.job_id, "metrics", self.pending_metrics)
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
            self.store.upload(sidecar(path))  # first, as the trainer commits them
            self.store.upload(path)

    def _delete_pruned(self) -> None:
        """Remove the store's copies of checkpoints the trainer pruned (after the commit)."""
        while self.pruned and self.store is not None:
            path = self.pruned.pop()
            try:
                self.store.delete(sidecar(path))
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
                to_evaluate.append(checkpoint_id)
            self._mark_pruned(session)
            event = {**event, "path": path, "checkpoint_id": checkpoint_id}
        append_event(session, self.job_id, kind, event)

    def _record_checkpoint(self, session: Session, event: dict[str, Any], path: str) -> str:
        """One row per (step, final): a file saved again at the same step (a resumed run
        that re-saves it) updates its row. Returns the row's id."""
        values = {
            "epoch": event["epoch"],
            "path": path,
            "size_bytes": event["size_bytes"],
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


def start_child(run_dir: Path, command: list[str] | None = None) -> subprocess.Popen[bytes]:
    """The training process (default: one rank; worker/launch.py builds torchrun's)."""
    log_file = (run_dir / "train.log").open("ab")
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ}  # see swav_core/cli.py
    return subprocess.Popen(
        command or [sys.executable, "-m", "worker.train_child", str(run_dir)],
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=die_with_parent,  # a worker killed with -9 leaves no orphan training
    )


def kill_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, sig)


@dataclass
class Supervision:
    """Why the runner asked its child to stop (first reason wins) and when."""

    reason: str | None = None
    at: float | None = None

    def request(self, reason: str, run_dir: Path) -> None:
        if self.reason is None:
            self.reason, self.at = reason, time.monotonic()
            (run_dir / "STOP").touch()


def run_job(job_id: str, settings: Settings) -> None:
    """Claim `job_id` and train it to an end state, or hand it back, or (lease lost) leave it.

    A multi-node job is claimed one node rank at a time (worker/gang.py).
    """
    from worker import gang

    if gang.is_multi_node(job_id):
        gang.run_node(job_id, settings)
        return
    claimed = claim(job_id, settings)
    if claimed is None:
        return  # a duplicate delivery, or cancelled while queued
    lease, job = claimed
    launch = NodeLaunch(nproc=job.gpus, run_id=f"{job_id}-{lease.token}")
    train_under_lease(lease, job, launch, settings)


def prepare_run_folder(
    job: Job, control_dir: Path, run_dir: Path, settings: Settings
) -> dict[str, Any]:
    """Clear the node's control files; the spec that its job.json gets (worker/train_child)."""
    for folder in (control_dir, run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for name in ("STOP", "outcome.json"):
        (control_dir / name).unlink(missing_ok=True)
    data_dir = dataset_images_dir(settings, job.dataset_id)
    spec: dict[str, Any] = {"config": job.config, "data_dir": str(data_dir)}
    if control_dir != run_dir:
        spec["run_dir"] = str(run_dir)
    store = artifact_store(settings)
    if store.remote:  # a run that began on another machine resumes from its checkpoints
        store.restore(run_dir / "checkpoints", exact=True)
        if not data_dir.is_dir():
            store.restore(data_dir)
    spec["launched_at"] = time.time()  # a budget (config.budget_s) counts from the launch
    return spec


def train_under_lease(
    lease: Lease,
    job: Job,
    launch: NodeLaunch,
    settings: Settings,
    gang: GangMonitor | None = None,
) -> None:
    """Train a claimed job (node 0 of it, with `gang`) until it ends or the lease is lost."""
    job_id = lease.job_id
    run_dir = job_run_dir(settings, job_id)
    spec = prepare_run_folder(job, run_dir, run_dir, settings)
    (run_dir / "job.json").write_text(json.dumps(spec))

    relay = Relay(lease, run_dir, settings, store=artifact_store(settings))
    relay.start_at_end()
    started = time.monotonic()
    stop = Supervision()
    child = start_child(run_dir, child_command(run_dir, launch))
    try:
        while child.poll() is None:
            time.sleep(settings.poll_interval_s)
            try:
                _supervise(lease, relay, job, started, stop, run_dir, settings)
                if gang is not None:
                    gang.check(stop, run_dir, settings)
            except LeaseLost:
                log.warning("job %s: lease lost to another runner; stopping", job_id)
                kill_group(child, signal.SIGKILL)
                child.wait()
                return
            if stop.at is not None and time.monotonic() - stop.at > _grace_s(stop, settings):
                kill_group(child, signal.SIGKILL)
    finally:
        if child.poll() is None:
            kill_group(child, signal.SIGKILL)
            child.wait()
    _finish(lease, relay, run_dir, child.returncode, time.monotonic() - started, stop, settings)


def _grace_s(stop: Supervision, settings: Settings) -> float:
    if stop.reason in ("lease_expiring", "rank_lost"):
        return 0.0
    return settings.shutdown_grace_s if stop.reason == "shutdown" else settings.cancel_grace_s


def _supervise(
    lease: Lease,
    relay: Relay,
    job: Job,
    started: float,
    stop: Supervision,
    run_dir: Path,
    settings: Settings,
) -> None:
    """One round of the runner's loop: relay, renew when due, and decide whether to stop."""
    try:
        relay.poll()
        due = lease.ttl_s - lease.remaining_s() >= settings.lease_renew_s
        if due and lease.renew() == "cancelling":
            stop.request("cancel", run_dir)
    except DBAPIError as error:
        log.warning("job %s: database unreachable (%s)", lease.job_id, type(error).__name__)
        if lease.remaining_s() < settings.lease_renew_s:
            stop.request("lease_expiring", run_dir)
    if SHUTDOWN.is_set():
        stop.request("shutdown", run_dir)
    elapsed = job.compute_seconds + time.monotonic() - started
    if job.max_runtime_s is not None and elapsed > job.max_runtime_s:
        stop.request("timeout", run_dir)


def _finish(
    lease: Lease,
    relay: Relay,
    run_dir: Path,
    returncode: int,
    seconds: float,
    stop: Supervision,
    settings: Settings,
) -> None:
    """Relay what is left and record how the run ended, under the lease.

    Retries while the database is unreachable and the lease is not yet expired; past that
    the reconciler decides (the job resumes from its last checkpoint elsewhere).
    """
    outcome_path = run_dir / "outcome.json"
    outcome = json.loads(outcome_path.read_text()) if outcome_path.exists() else None
    requeue = False
    gpus, nodes = 1, 1
    while True:
        try:
            relay.poll(flush=True)
            with session_scope() as session:
                job = lease.guard(session)
                job.compute_seconds += seconds
                job.lease_owner, job.lease_expires_at = None, None
                requeue = _record_end(session, job, outcome, returncode, stop)
                gpus, nodes = job.gpus, job.nodes
                if nodes > 1:
                    from worker.gang import release_ranks

                    release_ranks(session, job.id)  # the next run gathers a new gang
            break
        except LeaseLost:
            return
        except DBAPIError:
            if stop.reason == "lease_expiring" or lease.remaining_s() <= 0:
                log.warning("job %s: left to the reconciler (database unreachable)", lease.job_id)
                return
            time.sleep(min(2.0, settings.lease_renew_s))
    relay.close()
    if requeue:
        with contextlib.suppress(Exception):  # the reconciler re-sends it otherwise
            enqueue_job(lease.job_id, gpus, nodes)


def _record_end(
    session: Session,
    job: Job,
    outcome: dict[str, Any] | None,
    returncode: int,
    stop: Supervision,
) -> bool:
    """Move the job to its end state (or back to queued); whether to send it again."""
    status = outcome["status"] if outcome else None
    if status == "completed":
        change_status(session, job.id, "succeeded", eta_s=0.0)
    elif stop.reason == "cancel" and status != "failed":
        change_status(session, job.id, "cancelled")
    elif status == "failed" and outcome is not None and (
        outcome["error"]["code"] in NOT_RETRIED or job.attempt >= job.max_attempts
    ):
        error = outcome["error"]
        change_status(
            session, job.id, "failed", error_code=error["code"], error_message=error["message"]
        )
    elif stop.reason == "timeout":
        change_status(
            session,
            job.id,
            "failed",
            error_code="timeout",
            error_message=f"the job ran for longer than its max_runtime_s ({job.max_runtime_s} s);"
            " its last checkpoint is kept",
        )
    elif stop.reason == "shutdown" or (status == "stopped" and stop.reason is None):
        # A hand-back does not use up an attempt: the next claim counts it again. A run
        # that stopped without a reason here was stopped by another node's worker.
        append_event(session, job.id, "requeued", {"reason": "worker_shutdown"})
        return change_status(
            session, job.id, "queued", expected=("running",), attempt=job.attempt - 1,
            dispatched_at=utcnow(),
        )
    elif job.attempt < job.max_attempts:
        reason = (
            stop.reason if stop.reason == "rank_lost"
            else outcome["error"]["code"] if outcome else f"exit code {returncode}"
        )
        append_event(session, job.id, "requeued", {"reason": reason, "attempt": job.attempt})
        return change_status(
            session, job.id, "queued", expected=("running",), dispatched_at=utcnow()
        )
    else:
        change_status(
            session,
            job.id,
            "failed",
            error_code="worker_lost",
            error_message=f"the training process died (exit code {returncode}) on each of "
            f"{job.attempt} attempts; see train.log in the job's folder",
        )
    return False
