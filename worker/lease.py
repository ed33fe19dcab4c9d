"""A runner's claim on a job: a compare-and-set that bumps the fencing token, and a lease.

Claiming a queued job sets its owner, a lease expiry and a new fencing token. Every write
the runner makes afterwards goes through `Lease.guard`, which locks the job row and checks
that the token is still this runner's, so a runner whose lease was taken over (a duplicate
delivery, a worker presumed dead) cannot write anything.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from swav_service.db import session_scope
from swav_service.job_state import change_status
from swav_service.models import Job, utcnow
from swav_service.settings import Settings


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
    read_at: float = field(default_factory=time.monotonic)

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
        self.renewed_at = self.read_at = started
        return status

    def status(self) -> str:
        """The job's status, read without writing (a cancel shows as "cancelling" here
        well before the next renewal). Raises LeaseLost, or a database error."""
        self.read_at = time.monotonic()
        with session_scope() as session:
            status = session.execute(
                select(Job.status).where(Job.id == self.job_id, Job.fencing_token == self.token)
            ).scalar_one_or_none()
        if status is None:
            raise LeaseLost(self.job_id)
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
            read_token=job.fencing_token,  # a claim that read a stale row changes nothing
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


