"""A node's claim on one rank of a multi-node job: the `job_ranks` rows and their leases.

Each worker that reads one of a multi-node job's messages claims the lowest free node
rank under a lease of its own, holding the job's fencing token at that moment
(worker/gang.py gathers the claimants into a gang). Node rank 0's claim also carries the
rendezvous endpoint. A rank row outlives nothing: the run's end, a requeue or the
reconciler deletes them all, so a node of an old gang cannot renew and stops.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from swav_core.distributed import free_port
from swav_service.db import session_scope
from swav_service.job_state import append_event
from swav_service.models import Job, JobRank, utcnow
from swav_service.settings import Settings
from worker.lease import LeaseLost, runner_name
from worker.resources import worker_address


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


def _in_line_before(job: Job) -> ColumnElement[bool]:
    """Jobs ahead of `job` in the gangs' one global order: by when they were last sent
    (`dispatched_at`, else `created_at`), then by id. A gang that waited in vain is sent
    again at the back (worker/gang.py), so an unformable job does not stay first."""
    key = func.coalesce(Job.dispatched_at, Job.created_at)
    mine = job.dispatched_at or job.created_at
    return or_(key < mine, and_(key == mine, Job.id < job.id))


def older_gang_forming(session: Session, job: Job, max_gpus: int) -> str | None:
    """A queued multi-node job ahead of `job` whose gang is forming (some, not all, of its
    ranks claimed under live leases) and that this worker could join; its id, or None."""
    rows = session.execute(
        select(Job.id, Job.nodes).where(
            Job.status == "queued", Job.nodes > 1, Job.gpus <= max_gpus, _in_line_before(job)
        )
    ).all()
    live = live_ranks(session, [job_id for job_id, _ in rows])
    return next((job_id for job_id, nodes in rows if 0 < live[job_id] < nodes), None)


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

    def give_way(self, max_gpus: int) -> str | None:
        """Release this rank if the job's gang is still incomplete and an older gang is
        forming (`older_gang_forming`); that job's id, or None (the rank is kept).

        Under the job row's lock, as node 0 starts the gang under it: a rank is never
        released from a gang that has just started.
        """
        with session_scope() as session:
            job = session.execute(
                select(Job).where(Job.id == self.job_id).with_for_update()
            ).scalar_one_or_none()
            if job is None or job.status != "queued" or job.fencing_token != self.token:
                return None
            if live_ranks(session, [job.id])[job.id] >= job.nodes:
                return None
            older = older_gang_forming(session, job, max_gpus)
            if older is not None:
                session.execute(delete(JobRank).where(self._mine()))
                append_event(
                    session, job.id, "rank_released",
                    {"node_rank": self.node_rank, "reason": "older_gang_forming", "job": older},
                )
        return older

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
