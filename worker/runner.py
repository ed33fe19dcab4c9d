"""Running one training job under a lease: claim, heartbeat, relay, hand back or finish.

The parts live beside this module: the claim and the lease in worker/lease.py, the event
relay in worker/relay.py, the training child process in worker/child.py.

A runner claims a queued job with a compare-and-set that bumps the job's fencing token
and sets a lease (owner, expiry). It then starts the training child process and, while
the child runs, renews the lease and relays the child's events into the database. Every
write it makes (events, checkpoints, progress, the final state) first locks the job row
and checks that the token is still its own, so a runner whose lease was taken over (a
duplicate delivery, a worker that was presumed dead) cannot write anything.

A runner that cannot renew (the database is unreachable) stops its child before the
lease would expire, so by the time the reconciler hands the job to another worker,
nobody trains it any more. A worker told to shut down (SIGTERM) asks the child to
checkpoint and gives the job back to the queue without using up an attempt. A checkpoint
that takes the tenant past its stored-bytes limit (the relay checks after each) stops the
child the same way and fails the job with `storage_limit_exceeded`, not retried.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from swav_core.config import TrainConfig
from swav_service.db import session_scope
from swav_service.dispatch import enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.layout import dataset_images_dir, job_run_dir
from swav_service.models import Checkpoint, Dataset, Job, utcnow
from swav_service.prepared_copy import streamable_copy
from swav_service.settings import Settings
from swav_service.storage import artifact_store
from worker.child import SHUTDOWN, STORAGE_STOP, Supervision, start_child, supervise
from worker.fence import acquire_folder_lock, clear_heartbeats, heartbeat_path, write_heartbeat
from worker.launch import NodeLaunch, child_command
from worker.lease import Lease, LeaseLost, claim
from worker.ranks import release_ranks
from worker.relay import Relay
from worker.start_weights import start_weights_file

log = logging.getLogger(__name__)

NOT_RETRIED = frozenset(
    {
        "invalid_config",
        "invalid_data",
        "invalid_weights",
        "non_finite_loss",
        "out_of_memory",
        "checkpoint_failed",
        "collapsed",
    }
)


def run_single_node(job_id: str, settings: Settings) -> None:
    """Claim `job_id` and train it to an end state, or hand it back, or (lease lost) leave
    it. A job of several nodes is claimed one node rank at a time instead (worker/gang.py)."""
    claimed = claim(job_id, settings)
    if claimed is None:
        return  # a duplicate delivery, or cancelled while queued
    lease, job = claimed
    launch = NodeLaunch(nproc=job.gpus, run_id=f"{job_id}-{lease.token}")
    train_under_lease(lease, job, launch, settings)


def prepare_run_folder(
    job: Job, control_dir: Path, run_dir: Path, heartbeat: Path, settings: Settings
) -> dict[str, Any]:
    """Clear the node's control files; the spec that its job.json gets (worker/train_child).

    Called under the control folder's lock (worker/fence.py). The child obeys `heartbeat`,
    which the caller writes before it starts the child and at every renewal.
    """
    for folder in (control_dir, run_dir):
        folder.mkdir(parents=True, exist_ok=True)
    for name in ("STOP", "outcome.json"):
        (control_dir / name).unlink(missing_ok=True)
    clear_heartbeats(control_dir)
    data_dir = dataset_images_dir(settings, job.dataset_id)
    spec: dict[str, Any] = {
        "config": job.config,
        "data_dir": str(data_dir),
        "fence": {"heartbeat": str(heartbeat), "every_s": settings.poll_interval_s},
    }
    if control_dir != run_dir:
        spec["run_dir"] = str(run_dir)
    store = artifact_store(settings)
    prepared = None
    if settings.train_from_prepared:  # else, or when it cannot serve, the child decodes
        prepared = streamable_copy(
            settings, job.dataset_id, dataset_fingerprint(job.dataset_id),
            TrainConfig.model_validate(job.config).size_crops,
        )
    if prepared is not None:
        spec["prepared_dir"] = str(prepared)
        spec["stream_prepared"] = store.remote
    if store.remote:  # a run that began on another machine resumes from its checkpoints
        recorded = recorded_checkpoints(job.id, settings)
        store.restore(run_dir / "checkpoints", exact=True, recorded=recorded)
        if prepared is None and not data_dir.is_dir():
            store.restore(data_dir)
    start = start_weights_file(job, settings)
    if start is not None:  # applied only if the run starts fresh (swav_core/trainer.py)
        spec["start_weights"] = str(start)
    spec["launched_at"] = time.time()  # a budget (config.budget_s) counts from the launch
    return spec


def dataset_fingerprint(dataset_id: str) -> str | None:
    with session_scope() as session:
        dataset = session.get(Dataset, dataset_id)
        return None if dataset is None else dataset.fingerprint


def recorded_checkpoints(job_id: str, settings: Settings) -> list[Path]:
    """The files of the job's checkpoints that its rows say are available: a restore
    uploads them rather than remove them, even if their upload failed before."""
    with session_scope() as session:
        paths = session.scalars(
            select(Checkpoint.path).where(
                Checkpoint.job_id == job_id, Checkpoint.available.is_(True)
            )
        ).all()
    return [settings.artifacts / path for path in paths]


def train_under_lease(
    lease: Lease,
    job: Job,
    launch: NodeLaunch,
    settings: Settings,
    watch: Callable[[Supervision], None] | None = None,
) -> None:
    """Train a claimed job until it ends or the lease is lost.

    Node 0 of a multi-node job passes `watch` (worker/gang.py: GangMonitor.check), which
    runs every round beside the runner's own and may ask the child to stop.
    """
    job_id = lease.job_id
    run_dir = job_run_dir(settings, job_id)
    try:
        lock = acquire_folder_lock(
            run_dir, settings.run_lock_wait_s, settings.poll_interval_s,
            lambda: _keep(lease, settings),
        )
    except LeaseLost:
        return
    if lock is None:
        log.warning("job %s: its run folder is still held by another training process", job_id)
        _hand_back(lease, "run_folder_busy")
        return
    try:
        heartbeat = heartbeat_path(run_dir, lease.token)
        spec = prepare_run_folder(job, run_dir, run_dir, heartbeat, settings)
        (run_dir / "job.json").write_text(json.dumps(spec))
        write_heartbeat(heartbeat, lease.remaining_s(), settings.lease_renew_s)
        relay = Relay(lease, run_dir, settings, store=artifact_store(settings))
        relay.start_at_end()
        child = start_child(run_dir, child_command(run_dir, launch), lock)
    finally:
        lock.close()  # the child holds it now (or nobody: the start failed)
    started = time.monotonic()
    stop = Supervision(run_dir)

    def check() -> None:
        _supervise(lease, relay, job, started, stop, heartbeat, settings)
        if watch is not None:
            watch(stop)

    try:
        returncode = supervise(child, check, stop, settings)
    except LeaseLost:
        log.warning("job %s: lease lost to another runner; stopping", job_id)
        return
    _finish(lease, relay, run_dir, returncode, time.monotonic() - started, stop, settings)


def _keep(lease: Lease, settings: Settings) -> None:
    """Renew the lease when due while waiting for the run folder (LeaseLost propagates;
    through a database outage the wait goes on, and the hand-back then fails)."""
    if lease.ttl_s - lease.remaining_s() >= settings.lease_renew_s:
        with contextlib.suppress(DBAPIError):
            lease.renew()


def _hand_back(lease: Lease, reason: str) -> None:
    """Give a claimed job back to the queue before training it, without using an attempt
    (a job cancelled meanwhile is cancelled). A failure is left to the reconciler."""
    try:
        with session_scope() as session:
            job = lease.guard(session)
            job.lease_owner, job.lease_expires_at = None, None
            gpus, nodes = job.gpus, job.nodes
            if nodes > 1:
                release_ranks(session, job.id)
            if job.status == "cancelling":
                change_status(session, job.id, "cancelled")
                return
            append_event(session, job.id, "requeued", {"reason": reason})
            change_status(
                session, job.id, "queued", expected=("running",), attempt=job.attempt - 1,
                dispatched_at=utcnow(),
            )
        enqueue_job(lease.job_id, gpus, nodes)
    except (LeaseLost, DBAPIError):
        return
    except Exception:  # the broker: the reconciler re-sends a queued job without a message
        log.warning("job %s: handed back but not re-sent", lease.job_id, exc_info=True)


def _supervise(
    lease: Lease,
    relay: Relay,
    job: Job,
    started: float,
    stop: Supervision,
    heartbeat: Path,
    settings: Settings,
) -> None:
    """One round of the runner's loop: relay, renew when due (and tell the child so), look
    for a cancel between renewals, and decide whether to stop."""
    try:
        relay.poll()
        if relay.storage_refusal is not None:
            stop.request(STORAGE_STOP, relay.storage_refusal)
        status = None
        if lease.ttl_s - lease.remaining_s() >= settings.lease_renew_s:
            status = lease.renew()
            write_heartbeat(heartbeat, lease.remaining_s(), settings.lease_renew_s)
        elif time.monotonic() - lease.read_at >= settings.cancel_poll_s:
            status = lease.status()
        if status == "cancelling":
            stop.request("cancel")
    except DBAPIError as error:
        log.warning("job %s: database unreachable (%s)", lease.job_id, type(error).__name__)
        if lease.remaining_s() < settings.lease_renew_s:
            stop.request("lease_expiring")
    if SHUTDOWN.is_set():
        stop.request("shutdown")
    elapsed = job.compute_seconds + time.monotonic() - started
    if job.max_runtime_s is not None and elapsed > job.max_runtime_s:
        stop.request("timeout")


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
    elif stop.reason == STORAGE_STOP:  # not retried: the next run would cross it again
        change_status(
            session, job.id, "failed", error_code=STORAGE_STOP, error_message=stop.message
        )
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
