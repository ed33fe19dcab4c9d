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
its rank back and sends the job's message again; so does one whose gang is incomplete
while an older gang is forming (`wait_for_gang` explains why two gangs cannot deadlock).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from swav_service.db import session_scope
from swav_service.dispatch import enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.layout import job_run_dir
from swav_service.models import Job, JobRank, as_utc, utcnow
from swav_service.settings import Settings
from worker.child import SHUTDOWN, Supervision, start_child, supervise
from worker.fence import acquire_folder_lock, heartbeat_path, write_heartbeat
from worker.launch import NodeLaunch, child_command
from worker.lease import Lease, LeaseLost
from worker.ranks import RankLease, claim_rank, live_ranks
from worker.resources import detect_resources
from worker.runner import prepare_run_folder, train_under_lease

log = logging.getLogger(__name__)


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


def _give_back(rank: RankLease, why: str, to_back_of_line: bool = False) -> None:
    """Release the rank and send the job's message again for another worker; a gang that
    waited in vain also goes to the back of the gangs' line (worker/ranks.py)."""
    log.info("job %s: giving node rank %s back (%s)", rank.job_id, rank.node_rank, why)
    with contextlib.suppress(Exception):
        rank.release()
    with contextlib.suppress(Exception):
        with session_scope() as session:
            job = session.get(Job, rank.job_id)
            gpus, queued = (job.gpus, job.status == "queued") if job else (1, False)
            if job is not None and queued and to_back_of_line:
                job.dispatched_at = utcnow()
                append_event(
                    session, job.id, "rank_released",
                    {"node_rank": rank.node_rank, "reason": "gang_wait"},
                )
        if queued:
            enqueue_job(rank.job_id, gpus)


def _resend(job_id: str) -> None:
    with contextlib.suppress(Exception):  # the reconciler re-sends it otherwise
        with session_scope() as session:
            gpus = session.scalar(select(Job.gpus).where(Job.id == job_id)) or 1
        enqueue_job(job_id, gpus)


def wait_for_gang(rank: RankLease, settings: Settings) -> GangStart | None:
    """Renew the rank until the gang starts; None when the round is gone (the job was
    cancelled, or started without this worker) or this worker gave its rank back.

    No two gangs can hold each other's workers for ever: every round a claimant of an
    incomplete gang gives way to an older gang that is forming and that this worker could
    join (worker/ranks.py: one global order of jobs), so the oldest forming gang gets each
    worker that comes free; and past `gang_wait_s` even that gang gives its ranks back and
    goes to the back of the line, so one that cannot form (more nodes than workers) does
    not hold workers, or the head of the line, for long.
    """

    deadline = time.monotonic() + settings.gang_wait_s
    max_gpus = detect_resources(settings).ranks
    while True:
        try:
            if rank.due(settings.lease_renew_s):
                rank.renew()
            waiting, started = (
                _start_gang(rank, settings) if rank.node_rank == 0 else _gang_started(rank)
            )
            older = rank.give_way(max_gpus) if waiting and started is None else None
        except LeaseLost:
            return None
        except DBAPIError as error:
            log.warning("job %s: database unreachable (%s)", rank.job_id, type(error).__name__)
            waiting, started, older = True, None, None
        if started is not None:
            return started
        if older is not None:
            log.info("job %s: node rank %s gives way to job %s", rank.job_id, rank.node_rank, older)
            _resend(rank.job_id)
            return None
        if not waiting:
            with contextlib.suppress(Exception):
                rank.release()
            return None
        if SHUTDOWN.is_set():
            _give_back(rank, "worker shutting down")
            return None
        if time.monotonic() > deadline:
            why = f"the other nodes did not come within {settings.gang_wait_s} s"
            _give_back(rank, why, to_back_of_line=True)
            return None
        time.sleep(settings.poll_interval_s)


@dataclass
class GangMonitor:
    """Node 0's watch over the other nodes while its runner trains (worker/runner.py)."""

    rank: RankLease
    nodes: int
    settings: Settings

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

    def check(self, stop: Supervision) -> None:
        """Renew node 0's rank when due (LeaseLost propagates) and stop the run, reason
        `rank_lost`, if another node is lost. A database outage is left to the job lease."""
        try:
            if self.rank.due(self.settings.lease_renew_s):
                self.rank.renew()
            lost = self.lost_nodes()
        except DBAPIError:
            return
        if lost:
            log.warning("job %s: node ranks %s lost; stopping", self.rank.job_id, lost)
            stop.request("rank_lost")


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
    control = settings.job_dir(job.id) / "nodes" / str(rank.node_rank)
    run_dir = job_run_dir(settings, job.id)

    def keep() -> None:
        if rank.due(settings.lease_renew_s):
            with contextlib.suppress(DBAPIError):
                rank.renew()

    try:
        lock = acquire_folder_lock(
            control, settings.run_lock_wait_s, settings.poll_interval_s, keep
        )
    except LeaseLost:
        return
    if lock is None:  # node 0 sees this rank go and requeues the job
        log.warning("job %s: node %s's folder is still held; leaving", job.id, rank.node_rank)
        with contextlib.suppress(Exception):
            rank.release()
        return
    heartbeat = heartbeat_path(control, rank.token)
    launch = NodeLaunch(
        nproc=job.gpus,
        nodes=job.nodes,
        node_rank=rank.node_rank,
        endpoint=endpoint,
        run_id=f"{job.id}-{rank.token + 1}",
        local_addr=settings.worker_address,
    )
    try:
        spec = prepare_run_folder(job, control, run_dir, heartbeat, settings)
        (control / "job.json").write_text(json.dumps(spec))
        write_heartbeat(heartbeat, rank.remaining_s(), settings.lease_renew_s)
        child = start_child(control, child_command(control, launch), lock)
    finally:
        lock.close()  # the child holds it now
    stop = Supervision(control)

    def check() -> None:
        try:
            if rank.due(settings.lease_renew_s):
                rank.renew()
                write_heartbeat(heartbeat, rank.remaining_s(), settings.lease_renew_s)
            if not _job_running_at(job.id, rank.token + 1):
                log.info("job %s: the gang's run ended; node %s stops", job.id, rank.node_rank)
                stop.request("run_ended")
        except DBAPIError:
            if rank.remaining_s() < settings.lease_renew_s:
                stop.request("lease_expiring")
        if SHUTDOWN.is_set():
            stop.request("shutdown")  # every rank checkpoints and stops (any_rank)

    try:
        returncode = supervise(child, check, stop, settings)
    except LeaseLost:
        log.warning("job %s: node rank %s lost; stopping", job.id, rank.node_rank)
        returncode = child.returncode
    with contextlib.suppress(LeaseLost, DBAPIError):
        rank.record_exit(returncode)


def run_node(job_id: str, settings: Settings) -> None:
    """Claim a node rank of a multi-node job, wait for the gang, and train this node."""
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
    monitor = GangMonitor(rank, job.nodes, settings)
    train_under_lease(started.lease, job, launch, settings, watch=monitor.check)
