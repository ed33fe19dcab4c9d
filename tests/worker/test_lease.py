"""The claim and the lease (worker/lease.py): a compare-and-set, a fencing token, and
every write refused to a runner whose token is no longer the job's."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from swav_service.db import session_scope
from swav_service.job_state import change_status
from swav_service.models import Job, as_utc, utcnow
from swav_service.settings import Settings
from worker.lease import LeaseLost, claim


def test_claim_moves_a_queued_job_to_running_under_a_new_token(
    make_job: Callable[..., str], service_db: Settings
) -> None:
    job_id = make_job(fencing_token=4, attempt=1)
    claimed = claim(job_id, service_db)
    assert claimed is not None
    lease, job = claimed
    assert (lease.token, job.status, job.attempt, job.lease_owner) == (5, "running", 2, lease.owner)
    assert job.lease_expires_at is not None
    left = (as_utc(job.lease_expires_at) - utcnow()).total_seconds()
    assert service_db.lease_ttl_s - 5 < left <= service_db.lease_ttl_s


@pytest.mark.parametrize("status", ["running", "succeeded", "cancelled", "failed"])
def test_only_a_queued_job_can_be_claimed(
    make_job: Callable[..., str], service_db: Settings, status: str
) -> None:
    job_id = make_job(status=status, fencing_token=2)
    assert claim(job_id, service_db) is None
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.fencing_token) == (status, 2)


def test_a_second_claim_of_the_same_message_gets_nothing(
    make_job: Callable[..., str], service_db: Settings
) -> None:
    job_id = make_job()
    assert claim(job_id, service_db) is not None
    assert claim(job_id, service_db) is None  # a duplicate delivery


def test_renew_extends_the_lease_and_reports_a_cancel(
    make_job: Callable[..., str], service_db: Settings
) -> None:
    job_id = make_job()
    claimed = claim(job_id, service_db)
    assert claimed is not None
    lease, _ = claimed
    assert lease.renew() == "running"
    with session_scope() as session:
        change_status(session, job_id, "cancelling")
    assert lease.renew() == "cancelling"


def test_a_taken_over_lease_can_neither_renew_nor_write(
    make_job: Callable[..., str], service_db: Settings
) -> None:
    job_id = make_job()
    claimed = claim(job_id, service_db)
    assert claimed is not None
    old, _ = claimed
    with session_scope() as session:  # the reconciler requeued it; another runner claimed it
        change_status(session, job_id, "queued")
    new = claim(job_id, service_db)
    assert new is not None and new[0].token == old.token + 1
    with pytest.raises(LeaseLost):
        old.renew()
    with pytest.raises(LeaseLost), session_scope() as session:
        old.guard(session)
    with session_scope() as session:
        assert new[0].guard(session).id == job_id


def test_a_finished_job_ends_the_lease(make_job: Callable[..., str], service_db: Settings) -> None:
    job_id = make_job()
    claimed = claim(job_id, service_db)
    assert claimed is not None
    with session_scope() as session:
        change_status(session, job_id, "succeeded")
    with pytest.raises(LeaseLost):
        claimed[0].renew()


def test_a_claim_that_read_a_stale_token_changes_nothing(
    make_job: Callable[..., str], service_db: Settings
) -> None:
    """The claim's compare-and-set checks the token it read: a runner that read the job,
    then lost the race to one that claimed and handed it back, does not claim it again
    with a token computed from its stale read (two runners would hold one token)."""
    job_id = make_job(fencing_token=3)
    with session_scope() as session:
        assert not change_status(session, job_id, "running", expected=("queued",),
                                 read_token=2, fencing_token=3)
        job = session.get(Job, job_id)
        assert job is not None and (job.status, job.fencing_token) == ("queued", 3)
        assert change_status(session, job_id, "running", expected=("queued",),
                             read_token=3, fencing_token=4)
