"""The reconciler: makes the broker and the runners agree with the database again.

Celery on Redis loses work in known ways: a worker killed with -9 leaves its job
`running` with nobody behind it; a Redis restart without persistence drops queued
messages; a message read by a dying worker waits hours for the visibility timeout. The
database is the source of truth, so a periodic pass (every worker runs one; each change
is a compare-and-set, so several at once are safe) repairs each case:

- a running job whose lease expired goes back to `queued` (its fencing token bumped, so
  the lost runner can never write again) and resumes from its last checkpoint, until
  `max_attempts` claims have been lost; then it fails with `worker_lost`;
- a cancelling job whose lease expired is `cancelled` (nobody is left to stop);
- a queued job whose message is in neither the broker's queue nor its unacked set after
  `resend_after_s` is sent again (a duplicate is harmless: claims are compare-and-set);
  a multi-node job gets one per node rank neither claimed nor waiting in a queue;
- a deleted dataset's images are removed from the artifact store (worker/store_sweep.py).

A job that leaves its run this way also loses its node-rank claims (worker/ranks.py), so
the nodes of a multi-node gang stop, and the next run gathers a new one. Short tasks
(ingestion, batch embedding, evaluation) get the same care in worker/short_reconcile.py.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update

from swav_service.db import session_scope
from swav_service.dispatch import TRAIN_TASK, enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.models import Job, Worker, utcnow
from swav_service.settings import Settings
from worker.broker_view import broker_messages
from worker.ranks import live_ranks, release_ranks
from worker.short_reconcile import expired_short_leases, lost_short_messages
from worker.store_sweep import purge_deleted_datasets

log = logging.getLogger(__name__)


def _expired_leases(settings: Settings) -> int:
    now = utcnow()
    moved = 0
    with session_scope() as session:
        rows = session.execute(
            select(
                Job.id, Job.status, Job.fencing_token, Job.attempt, Job.max_attempts, Job.gpus,
                Job.nodes,
            ).where(
                Job.status.in_(("running", "cancelling")),
                func.coalesce(Job.lease_expires_at, Job.updated_at) < now,
            )
        ).all()
    for job_id, status, token, attempt, max_attempts, gpus, nodes in rows:
        with session_scope() as session:
            fields = {"fencing_token": token + 1, "lease_owner": None, "lease_expires_at": None}
            still = (Job.fencing_token == token,)
            locked = session.execute(
                select(Job.id).where(Job.id == job_id, *still).with_for_update()
            ).first()
            if locked is None:
                continue
            release_ranks(session, job_id)  # a multi-node job's next run claims them anew
            if status == "cancelling":
                change_status(session, job_id, "cancelled", expected=("cancelling",), **fields)
                moved += 1
            elif attempt < max_attempts:
                append_event(session, job_id, "requeued", {"reason": "lease_expired",
                                                           "attempt": attempt})
                change_status(session, job_id, "queued", expected=("running",),
                              dispatched_at=now, **fields)
                moved += 1
            else:
                change_status(
                    session, job_id, "failed", expected=("running",),
                    error_code="worker_lost",
                    error_message=f"the worker running this job stopped renewing its lease on "
                    f"each of {attempt} attempts (max_attempts {max_attempts}); its last "
                    "checkpoint is kept and POST /v1/jobs/{id}/resume starts it again",
                    **fields,
                )
                moved += 1
                continue
        if status == "running":
            try:
                enqueue_job(job_id, gpus, nodes)
            except Exception:
                log.warning("could not send job %s; the next pass retries", job_id)
    return moved


def _lost_messages(settings: Settings) -> int:
    """Re-send what queued jobs miss: one message for a single-node job with none waiting
    or unacked; for a multi-node job, one per node rank that is neither claimed (under a
    live lease) nor has a message waiting (an unacked one is a claimant's, or a dead
    worker's that will not claim)."""
    cutoff = utcnow() - timedelta(seconds=settings.resend_after_s)
    with session_scope() as session:
        waiting = session.execute(
            select(Job.id, Job.gpus, Job.nodes).where(
                Job.status == "queued",
                func.coalesce(Job.dispatched_at, Job.updated_at) < cutoff,
            )
        ).all()
        gangs = [job_id for job_id, _, nodes in waiting if nodes > 1]
        claimed = live_ranks(session, gangs) if gangs else Counter()
    if not waiting:
        return 0
    queued, unacked = broker_messages(settings, settings.train_queue)
    resent = 0
    for job_id, gpus, nodes in waiting:
        key = (TRAIN_TASK, job_id)
        if nodes > 1:
            missing = nodes - claimed[job_id] - queued[key]
        else:
            missing = 0 if queued[key] or unacked[key] else 1
        if missing <= 0:
            continue
        enqueue_job(job_id, gpus, missing)
        with session_scope() as session:
            session.execute(update(Job).where(Job.id == job_id).values(dispatched_at=utcnow()))
        log.info("re-sent job %s: its message was not in the broker", job_id)
        resent += 1
    return resent


def reconcile_once(settings: Settings) -> dict[str, int]:
    """One pass; how many jobs it moved or re-sent, short tasks it requeued or re-sent,
    and datasets it purged from the store."""
    return {
        "leases": _expired_leases(settings),
        "resent": _lost_messages(settings),
        "short_leases": expired_short_leases(settings),
        "short_resent": lost_short_messages(settings),
        "datasets_purged": purge_deleted_datasets(settings),
    }


def record_presence(
    name: str, queues: str, job_id: str | None = None, resources: dict[str, Any] | None = None
) -> None:
    """Upsert this worker's heartbeat row (read by /metrics, operators and `preset: auto`);
    `resources` is what a training worker offers (worker/resources.py: device, gpus,
    ranks, address, and its measured `machine` profile once known)."""
    offered = {"pid": os.getpid(), **(resources or {})}
    with session_scope() as session:
        row = session.get(Worker, name)
        if row is None:
            session.add(Worker(name=name, queues=queues, job_id=job_id, resources=offered))
        else:
            row.queues, row.job_id, row.last_seen_at = queues, job_id, utcnow()
            if row.resources != offered:
                row.resources = offered


class Supervisor(threading.Thread):
    """A daemon thread in each worker: heartbeats, and the reconciler every interval."""

    def __init__(self, settings: Settings, name: str, queues: str) -> None:
        super().__init__(name="swav-supervisor", daemon=True)
        self.settings, self.worker_name, self.queues = settings, name, queues
        self.stopped = threading.Event()
        self.current_job: str | None = None
        self.resources: dict[str, Any] = {}

    def run(self) -> None:
        step = min(self.settings.worker_heartbeat_s, self.settings.reconcile_interval_s)
        next_reconcile = time.monotonic()
        while True:
            try:
                record_presence(self.worker_name, self.queues, self.current_job, self.resources)
                if time.monotonic() >= next_reconcile:
                    repaired = reconcile_once(self.settings)
                    if any(repaired.values()):
                        log.info("reconciler: %s", repaired)
                    next_reconcile = time.monotonic() + self.settings.reconcile_interval_s
            except Exception:
                log.warning("reconciler pass failed; retrying", exc_info=True)
            if self.stopped.wait(step):
                return


def clear_presence(name: str) -> None:
    with session_scope() as session:
        row = session.get(Worker, name)
        if row is not None:
            session.delete(row)

