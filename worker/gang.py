"""Multi-node jobs: M workers claim a job's node ranks, meet, and train it as one gang.

A job with `nodes` = M > 1 is sent as M messages to the queue of its size. A worker that
reads one claims the lowest free node rank: a `job_ranks` row under a lease of its own,
holding the job's fencing token T at that moment. Node rank 0's claimant also records
the rendezvous endpoint (its address and a free port). Each claimant then waits, renewing
its rank, until the gang is complete:

- node rank 0, once M live ranks hold token T, moves the job to running (token T + 1,
  one attempt, the job lease, as a single-node claim does) and trains it as usual
  (worker/runner.py: the relay of events, status and checkpoints is its alone), with
  torch's launcher as node 0 of M hosting the rendezvous store at its endpoint;
- every other node waits for the job to run at token T + 1, then starts its launcher
  as node R, joining the endpoint, and only renews its rank while it trains.

If a node is lost (its rank's lease expires before its training ended, or its row is
gone), node 0 stops its training and the job goes back to the queue, to resume from its
last checkpoint with a new gang (`max_attempts` still counts). Node 0 lost is the
single-node case: its job lease expires, and the reconciler requeues the job. Either way
the job's rank rows are deleted, so a node of the old gang cannot renew and stops too. A
claimant that waits longer than `gang_wait_s`, or whose worker is asked to stop, gives
its rank back and sends the job's message again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, and_, delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from swav_core.distributed import free_port
from swav_service.db import session_scope
from swav_service.dispatch import enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.layout import job_run_dir
from swav_service.models import Job, JobRank, as_utc, utcnow
from swav_service.settings import Settings
from worker.child import SHUTDOWN, Supervision, kill_group, start_child
from worker.launch import NodeLaunch, child_command
from worker.lease import Lease, LeaseLost, runner_name
from worker.resources import worker_address

log = logging.getLogger(__name__)


def release_ranks(session: Session, job_id: str) -> None:
    """Forget every node claim of the job (it leaves its run: requeued or finished)."""
    session.execute(delete(JobRank).where(JobRank.job_id == job_id))


def live_ranks(session: Session, job_ids: Sequence[str]) -> Counter[str]:
    """Claimed node ranks under a live lease, per job, of the job's current token."""
    rows = session.execute(
        select(JobRank.job_id, func.count())
        .join(Job, Job.id == JobRank.job_id)
        .where(
            JobRank.job_id.in_(job_ids),
            JobRank.token == Job.fencing_token,
            JobRank.lease_expires_at >= utcnow(),
        )
        .group_by(JobRank.job_id)
    ).all()
    return Counter({job_id: int(count) for job_id, count in rows})


def is_multi_node(job_id: str) -> bool:
    with session_scope() as session:
        return bool((session.scalar(select(Job.nodes).where(Job.id == job_id)) or 1) > 1)


@dataclass
class RankLease:
    """This worker's claim on node `node_rank` of a job; lost once its row is gone."""

    job_id: str
    node_rank: int
    owner: str
    token: int
    ttl_s: float
    endpoint: str | None = None
    renewed_at: float = field(default_factory=time.monotonic)

    def _mine(self) -> ColumnElement[bool]:
        return and_(
            JobRank.job_id == self.job_id,
            JobRank.node_rank == self.node_rank,
            JobRank.owner == self.owner,
            JobRank.token == self.token,
        )

    def renew(self) -> None:
        """Extend the rank's lease; raises LeaseLost if the row is no longer this one's."""

        started = time.monotonic()
        with session_scope() as session:
            result = session.execute(
                update(JobRank)
                .where(self._mine())
                .values(lease_expires_at=utcnow() + timedelta(seconds=self.ttl_s))
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]
                raise LeaseLost(self.job_id)
        self.renewed_at = started

    def due(self, renew_every_s: float) -> bool:
        return time.monotonic() - self.renewed_at >= renew_every_s

    def remaining_s(self) -> float:
        return self.ttl_s - (time.monotonic() - self.renewed_at)

    def release(self) -> None:
        with session_scope() as session:
            session.execute(delete(JobRank).where(self._mine()))

    def record_exit(self, code: int) -> None:
        """Mark this node's training as ended, so that node 0 does not count it as lost."""
        with session_scope() as session:
            session.execute(update(JobRank).where(self._mine()).values(exit_code=code))


def claim_rank(job_id: str, settings: Settings) -> RankLease | None:
    """Claim the lowest free node rank of a queued multi-node job; None if there is none
    (the job is not queued, or every rank is claimed: a duplicate message)."""

    owner = runner_name()
    with session_scope() as session:
        job = session.execute(
            select(Job).where(Job.id == job_id).with_for_update()
        ).scalar_one_or_none()
        if job is None or job.status != "queued" or job.nodes <= 1:
            return None
        now = utcnow()
        session.execute(  # claims of dead claimants, or of an earlier run
            delete(JobRank).where(
                JobRank.job_id == job_id,
                (JobRank.lease_expires_at < now) | (JobRank.token != job.fencing_token),
            )
        )
        taken = set(session.scalars(select(JobRank.node_rank).where(JobRank.job_id == job_id)))
        free = [r for r in range(job.nodes) if r not in taken]
        if not free:
            return None
        rank = free[0]
        endpoint = f"{worker_address(settings)}:{free_port()}" if rank == 0 else None
        session.add(
            JobRank(
                job_id=job_id,
                node_rank=rank,
                owner=owner,
                token=job.fencing_token,
                endpoint=endpoint,
                lease_expires_at=now + timedelta(seconds=settings.lease_ttl_s),
            )
        )
        append_event(
            session,
            job_id,
            "rank_claimed",
            {"node_rank": rank, "claimed": len(taken) + 1, "nodes": job.nodes},
        )
        token = job.fencing_token
    return RankLease(job_id, rank, owner, token, settings.lease_ttl_s, endpoint)


@dataclass(frozen=True)
class GangStart:
    """The gang's run, as one node sees it: node 0 also holds the job's lease."""

    job: Job
    endpoint: str
    lease: Lease | None = None


def _start_gang(rank: RankLease, settings: Settings) -> tuple[bool, GangStart | None]:
    """Node 0: move the job to running once every rank is claimed under a live lease.

    (True, None) while waiting; (False, None) once the round is gone; else the start.
    """

    with session_scope() as session:
        job = session.execute(
            select(Job).where(Job.id == rank.job_id).with_for_update()
        ).scalar_one_or_none()
        if job is None or job.status != "queued" or job.fencing_token != rank.token:
            return False, None
        if live_ranks(session, [job.id])[job.id] < job.nodes:
            return True, None
        change_status(
            session,
            job.id,
            "running",
            expected=("queued",),
            attempt=job.attempt + 1,
            started_at=job.started_at or utcnow(),
            lease_owner=rank.owner,
            lease_expires_at=utcnow() + timedelta(seconds=settings.lease_ttl_s),
            fencing_token=rank.token + 1,
        )
        session.refresh(job)
        session.expunge(job)
    lease = Lease(job.id, rank.owner, rank.token + 1, settings.lease_ttl_s)
    return False, GangStart(job, rank.endpoint or "", lease)


def _gang_started(rank: RankLease) -> tuple[bool, GangStart | None]:
    """Node R > 0: (True, None) while waiting; (False, None) once the round is gone."""
    with session_scope() as session:
        job = session.get(Job, rank.job_id)
        if job is None:
            return False, None
        if job.status == "queued" and job.fencing_token == rank.token:
            return True, None
        if job.status not in ("running", "cancelling") or job.fencing_token != rank.token + 1:
            return False, None
        endpoint = session.scalar(
            select(JobRank.endpoint).where(
                JobRank.job_id == job.id, JobRank.node_rank == 0, JobRank.token == rank.token
            )
        )
        session.expunge(job)
    if endpoint is None:
        return False, None
    return False, GangStart(job, endpoint)


def _give_back(rank: RankLease, why: str) -> None:
    """Release the rank and send the job's message again for another worker."""
    log.info("job %s: giving node rank %s back (%s)", rank.job_id, rank.node_rank, why)
    with contextlib.suppress(Exception):
        rank.release()
    with contextlib.suppress(Exception):
        with session_scope() as session:
            job = session.get(Job, rank.job_id)
            gpus, queued = (job.gpus, job.status == "queued") if job else (1, False)
        if queued:
            enqueue_job(rank.job_id, gpus)


def wait_for_gang(rank: RankLease, settings: Settings) -> GangStart | None:
    """Renew the rank until the gang starts; None when the round is gone (the job was
    cancelled, or started without this worker) or this worker gave its rank back."""

    deadline = time.monotonic() + settings.gang_wait_s
    while True:
        try:
            if rank.due(settings.lease_renew_s):
                rank.renew()
            waiting, started = (
                _start_gang(rank, settings) if rank.node_rank == 0 else _gang_started(rank)
            )
        except LeaseLost:
            return None
        except DBAPIError as error:
            log.warning("job %s: database unreachable (%s)", rank.job_id, type(error).__name__)
            waiting, started = True, None
        if started is not None:
            return started
        if not waiting:
            with contextlib.suppress(Exception):
                rank.release()
            return None
        if SHUTDOWN.is_set():
            _give_back(rank, "worker shutting down")
            return None
        if time.monotonic() > deadline:
            _give_back(rank, f"the other nodes did not come within {settings.gang_wait_s} s")
            return None
        time.sleep(settings.poll_interval_s)


@dataclass
class GangMonitor:
    """Node 0's watch over the other nodes while its runner trains (worker/runner.py)."""

    rank: RankLease
    nodes: int

    def lost_nodes(self) -> list[int]:
        """Node ranks whose claim is gone, or expired while their training still ran."""
        with session_scope() as session:
            rows = session.execute(
                select(JobRank.node_rank, JobRank.lease_expires_at, JobRank.exit_code).where(
                    JobRank.job_id == self.rank.job_id, JobRank.token == self.rank.token
                )
            ).all()
        now = utcnow()
        alive = {
            r for r, expires, code in rows if code is not None or as_utc(expires) >= now
        }
        return [r for r in range(1, self.nodes) if r not in alive]

    def check(self, stop: Supervision, run_dir: Path, settings: Settings) -> None:
        """Renew node 0's rank when due (LeaseLost propagates) and stop the run, reason
        `rank_lost`, if another node is lost. A database outage is left to the job lease."""
        try:
            if self.rank.due(settings.lease_renew_s):
                self.rank.renew()
            lost = self.lost_nodes()
        except DBAPIError:
            return
        if lost:
            log.warning("job %s: node ranks %s lost; stopping", self.rank.job_id, lost)
            stop.request("rank_lost", run_dir)


def _job_running_at(job_id: str, token: int) -> bool:
    with session_scope() as session:
        row = session.execute(
            select(Job.status, Job.fencing_token).where(Job.id == job_id)
        ).first()
    return row is not None and row[0] in ("running", "cancelling") and row[1] == token


def run_follower(rank: RankLease, job: Job, endpoint: str, settings: Settings) -> None:
    """Node R > 0: train this node's ranks while the gang's run lasts, renewing the rank.

    Its control files (job.json, STOP, outcome.json, train.log) are in the job's
    `nodes/R` folder; the training folder is the job's run folder, as on node 0.
    """
    from worker.runner import prepare_run_folder

    control = settings.job_dir(job.id) / "nodes" / str(rank.node_rank)
    run_dir = job_run_dir(settings, job.id)
    spec = prepare_run_folder(job, control, run_dir, settings)
    (control / "job.json").write_text(json.dumps(spec))
    launch = NodeLaunch(
        nproc=job.gpus,
        nodes=job.nodes,
        node_rank=rank.node_rank,
        endpoint=endpoint,
        run_id=f"{job.id}-{rank.token + 1}",
        local_addr=settings.worker_address,
    )
    child = start_child(control, child_command(control, launch))
    stopping_since: float | None = None
    try:
        while child.poll() is None:
            time.sleep(settings.poll_interval_s)
            try:
                if rank.due(settings.lease_renew_s):
                    rank.renew()
                if not _job_running_at(job.id, rank.token + 1):
                    log.info("job %s: the gang's run ended; node %s stops", job.id, rank.node_rank)
                    break
            except LeaseLost:
                log.warning("job %s: node rank %s lost; stopping", job.id, rank.node_rank)
                break
            except DBAPIError:
                if rank.remaining_s() < settings.lease_renew_s:
                    break
            if SHUTDOWN.is_set() and stopping_since is None:
                (control / "STOP").touch()  # every rank checkpoints and stops (any_rank)
                stopping_since = time.monotonic()
            if stopping_since is not None and (
                time.monotonic() - stopping_since > settings.shutdown_grace_s
            ):
                break
    finally:
        if child.poll() is None:
            kill_group(child, signal.SIGKILL)
            child.wait()
    with contextlib.suppress(LeaseLost, DBAPIError):
        rank.record_exit(child.returncode)


def run_node(job_id: str, settings: Settings) -> None:
    """Claim a node rank of a multi-node job, wait for the gang, and train this node."""
    from worker.runner import train_under_lease

    rank = claim_rank(job_id, settings)
    if rank is None:
        return
    started = wait_for_gang(rank, settings)
    if started is None:
        return
    job = started.job
    if started.lease is None:
        run_follower(rank, job, started.endpoint, settings)
        return
    launch = NodeLaunch(
        nproc=job.gpus,
        nodes=job.nodes,
        node_rank=0,
        endpoint=started.endpoint,
        run_id=f"{job_id}-{started.lease.token}",
        local_addr=settings.worker_address,
    )
    train_under_lease(started.lease, job, launch, settings, GangMonitor(rank, job.nodes))
