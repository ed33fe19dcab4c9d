"""Database operations shared by the API and the workers: events and job state changes.

Every change a user can observe goes through here, so that terminal states never change
and every state change leaves an event in the job's ordered log.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from swav_service.models import ACTIVE_JOB_STATUSES, TERMINAL_JOB_STATUSES, Job, JobEvent, utcnow


def append_event(session: Session, job_id: str, kind: str, data: dict[str, Any]) -> JobEvent:
    """Add the job's next event (seq = last + 1). The caller commits."""
    last = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    event = JobEvent(job_id=job_id, seq=(last or 0) + 1, type=kind, data=data)
    session.add(event)
    session.flush()
    return event


def change_status(
    session: Session,
    job_id: str,
    status: str,
    *,
    expected: tuple[str, ...] | None = None,
    read_token: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
    **fields: Any,
) -> bool:
    """Move a job to `status` if it is in `expected` (default: any non-terminal state) and,
    given `read_token`, its fencing token is still the one the caller read.

    A compare-and-set in one UPDATE, so two writers cannot both win; returns whether this
    one did. Terminal states never change. Adds a "state" event on success.
    """
    allowed = expected or tuple(ACTIVE_JOB_STATUSES)
    values: dict[str, Any] = {"status": status, "updated_at": utcnow(), **fields}
    if status in TERMINAL_JOB_STATUSES:
        values["finished_at"] = utcnow()
    if error_code is not None or status in ("queued", "running"):
        values["error_code"] = error_code
        values["error_message"] = error_message
    statement = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if read_token is not None:
        statement = statement.where(Job.fencing_token == read_token)
    result = session.execute(statement.values(**values))
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return False
    data: dict[str, Any] = {"status": status}
    if error_code:
        data["error"] = {"code": error_code, "message": error_message}
    append_event(session, job_id, "state", data)
    return True


def evaluation_request() -> dict[str, Any]:
    """The checkpoint columns that ask for its quality report afresh: a new request gets
    its own attempts (worker/short_lease.py) and clears the last one's error."""
    return {
        "evaluation_requested_at": utcnow(),
        "evaluation_error": None,
        "task_attempts": 0,
        "task_sent_at": None,
    }
