"""Database operations shared by the API and the workers: events and job state changes.

Every change a user can observe goes through here, so that terminal states never change,
every state change leaves an event in the job's ordered log, and that log stays bounded
(`SWAV_MAX_EVENTS_PER_JOB`; repeated warnings counted, not repeated).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from swav_service.models import ACTIVE_JOB_STATUSES, TERMINAL_JOB_STATUSES, Job, JobEvent, utcnow
from swav_service.settings import get_settings

THINNED_KINDS = ("metrics", "epoch")  # progress samples; every other kind is kept


def append_event(
    session: Session,
    job_id: str,
    kind: str,
    data: dict[str, Any],
    max_events: int | None = None,
) -> JobEvent:
    """Add the job's next event (seq = last + 1). The caller commits.

    Past `max_events` (default: the setting; 0: no cap) the job's log is thinned
    (`_thin`), so a long run keeps a bounded log that still spans all of it.
    """
    last = session.scalar(select(func.max(JobEvent.seq)).where(JobEvent.job_id == job_id))
    event = JobEvent(job_id=job_id, seq=(last or 0) + 1, type=kind, data=data)
    session.add(event)
    session.flush()
    cap = get_settings().max_events_per_job if max_events is None else max_events
    if cap and event.seq > cap:  # fewer rows than seqs: only then can the cap be passed
        _thin(session, job_id, cap)
    return event


def _thin(session: Session, job_id: str, cap: int) -> None:
    """Past `cap` rows, keep the progress events (metrics, epoch) whose seq is a multiple
    of the smallest power-of-two stride that brings the log down to cap / 2 rows, plus the
    first and the newest of each kind; lifecycle events (states, checkpoints, warnings)
    are never removed.

    A stride over seq, not "every other row", so that repeated thinnings keep the samples
    evenly spread over the whole run: after one at stride s every survivor's seq is a
    multiple of s, and the next one (stride 2s or more) thins old and new samples alike.
    Down to cap / 2, so thinning runs once per cap / 2 new events, not on every one.

    Seqs are never reused or reordered: the newest event of each kind stays, so the job's
    largest seq only grows, and `after=<seq>` cursors and SSE `Last-Event-ID`s stay valid;
    a reader sees gaps in seq where samples were thinned.
    """
    rows = session.execute(
        select(JobEvent.id, JobEvent.seq, JobEvent.type)
        .where(JobEvent.job_id == job_id)
        .order_by(JobEvent.seq)
    ).all()
    if len(rows) <= cap:
        return
    progress = [row for row in rows if row.type in THINNED_KINDS]
    pinned = {ids[0] for ids in _ends(progress)} | {ids[1] for ids in _ends(progress)}
    lifecycle = len(rows) - len(progress)
    stride = 2
    while True:
        kept = [r for r in progress if r.id in pinned or r.seq % stride == 0]
        if lifecycle + len(kept) <= cap // 2 or len(kept) == len(pinned):
            break
        stride *= 2
    doomed = {r.id for r in progress} - {r.id for r in kept}
    if doomed:
        session.execute(delete(JobEvent).where(JobEvent.id.in_(doomed)))


def _ends(progress: list[Any]) -> list[tuple[int, int]]:
    """(id of the first, id of the newest) event of each thinned kind present."""
    ends = []
    for kind in THINNED_KINDS:
        ids = [row.id for row in progress if row.type == kind]
        if ids:
            ends.append((ids[0], ids[-1]))
    return ends


def append_warning(
    session: Session, job_id: str, data: dict[str, Any], max_events: int | None = None
) -> JobEvent:
    """A "warning" event; a repeat of an earlier warning of the job (same code and
    message) adds to that event's `count` (and `last_step`) instead of adding a row, so a
    warning a run raises every step costs one row. The caller commits."""
    for row in session.scalars(
        select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.type == "warning")
    ):
        if (row.data.get("code"), row.data.get("message")) == (
            data.get("code"), data.get("message")
        ):
            repeated = {**row.data, "count": int(row.data.get("count", 1)) + 1}
            if "step" in data:
                repeated["last_step"] = data["step"]
            row.data = repeated  # a new dict, so that the JSON column is written
            session.flush()
            return row
    return append_event(session, job_id, "warning", {**data, "count": 1}, max_events)


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
