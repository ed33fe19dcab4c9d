"""How a run's end becomes the job's state (worker/runner.py `_record_end`, `_finish`).

The decision table, one row per way a run can end, on a real database: what the child
wrote in outcome.json, why the runner asked it to stop, its exit code and the attempts
used. The multi-minute kill -9 scenarios in tests/e2e exercise the same table end to end.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from swav_service.db import session_scope
from swav_service.models import Job, JobEvent
from swav_service.settings import Settings
from worker.child import Supervision
from worker.lease import claim
from worker.relay import Relay
from worker.runner import _finish, _record_end


def failed(code: str) -> dict[str, Any]:
    return {"status": "failed", "error": {"code": code, "message": f"{code} happened"}}


COMPLETED = {"status": "completed"}
STOPPED = {"status": "stopped"}

# (outcome, stop reason, exit code, attempt, max_attempts) -> (status, error_code, attempt
# afterwards, sent again, the requeued event's reason)
TABLE = [
    pytest.param(COMPLETED, None, 0, 1, 3, ("succeeded", None, 1, False, None), id="completed"),
    pytest.param(STOPPED, "cancel", 0, 1, 3, ("cancelled", None, 1, False, None), id="cancel"),
    pytest.param(None, "cancel", -9, 1, 3, ("cancelled", None, 1, False, None),
                 id="cancel-killed-after-grace"),
    pytest.param(failed("internal"), "cancel", 1, 3, 3, ("failed", "internal", 3, False, None),
                 id="failure-during-cancel-is-kept"),
    pytest.param(failed("out_of_memory"), None, 1, 1, 3,
                 ("failed", "out_of_memory", 1, False, None), id="not-retried-code"),
    pytest.param(failed("collapsed"), None, 1, 1, 3, ("failed", "collapsed", 1, False, None),
                 id="collapse-not-retried"),
    pytest.param(failed("internal"), None, 1, 1, 3, ("queued", None, 1, True, "internal"),
                 id="retried-failure"),
    pytest.param(failed("internal"), None, 1, 3, 3, ("failed", "internal", 3, False, None),
                 id="last-attempt-failure"),
    pytest.param(STOPPED, "timeout", 0, 1, 3, ("failed", "timeout", 1, False, None),
                 id="max-runtime"),
    pytest.param(STOPPED, "storage_limit_exceeded", 0, 1, 3,
                 ("failed", "storage_limit_exceeded", 1, False, None), id="storage-limit"),
    pytest.param(None, "storage_limit_exceeded", -9, 1, 3,
                 ("failed", "storage_limit_exceeded", 1, False, None),
                 id="storage-limit-killed-after-grace"),
    pytest.param(STOPPED, "shutdown", 0, 2, 3, ("queued", None, 1, True, "worker_shutdown"),
                 id="shutdown-hands-back-the-attempt"),
    pytest.param(STOPPED, None, 0, 3, 3, ("queued", None, 2, True, "worker_shutdown"),
                 id="stopped-by-another-node"),
    pytest.param(STOPPED, "rank_lost", 0, 1, 3, ("queued", None, 1, True, "rank_lost"),
                 id="node-lost"),
    pytest.param(None, None, -9, 1, 3, ("queued", None, 1, True, "exit code -9"),
                 id="killed-retried"),
    pytest.param(None, None, -9, 3, 3, ("failed", "worker_lost", 3, False, None),
                 id="killed-on-last-attempt"),
]


def requeue_reasons(job_id: str) -> list[Any]:
    with session_scope() as session:
        rows = session.scalars(
            select(JobEvent.data).where(JobEvent.job_id == job_id, JobEvent.type == "requeued")
        )
        return [data["reason"] for data in rows]


@pytest.mark.parametrize(("outcome", "reason", "code", "attempt", "max_attempts", "want"), TABLE)
def test_record_end(
    make_job: Callable[..., str],
    tmp_path: Path,
    outcome: dict[str, Any] | None,
    reason: str | None,
    code: int,
    attempt: int,
    max_attempts: int,
    want: tuple[str, str | None, int, bool, str | None],
) -> None:
    job_id = make_job(status="running", attempt=attempt, max_attempts=max_attempts)
    stop = Supervision(tmp_path)
    if reason is not None:
        stop.request(reason)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        sent_again = _record_end(session, job, outcome, code, stop)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        status, error_code, attempt_after, requeued, event_reason = want
        assert (job.status, job.error_code, job.attempt) == (status, error_code, attempt_after)
        assert sent_again is requeued
        assert (job.finished_at is not None) == (status in ("succeeded", "failed", "cancelled"))
    assert requeue_reasons(job_id) == ([event_reason] if event_reason else [])


def test_finish_records_the_end_and_frees_the_lease(
    make_job: Callable[..., str], service_db: Settings, tmp_path: Path
) -> None:
    job_id = make_job(compute_seconds=5.0)
    claimed = claim(job_id, service_db)
    assert claimed is not None
    lease, _ = claimed
    (tmp_path / "outcome.json").write_text('{"status": "completed"}')
    relay = Relay(lease, tmp_path, service_db)
    _finish(lease, relay, tmp_path, 0, 7.5, Supervision(tmp_path), service_db)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.compute_seconds) == ("succeeded", 12.5)
        assert (job.lease_owner, job.lease_expires_at) == (None, None)


def test_finish_under_a_lost_lease_writes_nothing(
    make_job: Callable[..., str], service_db: Settings, tmp_path: Path
) -> None:
    """A runner whose job was taken over (a newer fencing token) leaves the state alone."""
    job_id = make_job()
    claimed = claim(job_id, service_db)
    assert claimed is not None
    stale, _ = claimed
    with session_scope() as session:  # another runner took the job over
        job = session.get(Job, job_id)
        assert job is not None
        job.fencing_token += 1
    (tmp_path / "outcome.json").write_text('{"status": "completed"}')
    _finish(stale, Relay(stale, tmp_path, service_db), tmp_path, 0, 3.0,
            Supervision(tmp_path), service_db)
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.compute_seconds, job.lease_owner) == (
            "running", 0.0, stale.owner
        )
