"""A job's event log: `GET /v1/jobs/{id}/events` as JSON pages or a live server-sent stream.

Events are numbered per job (seq 1, 2, ...) and written by the worker and the API in the
same transactions as the state they describe. The stream polls the database in short
sessions of its own (no connection is held between polls; the request's session closes
as the route returns, api/deps.py), sends a keep-alive comment when idle, and ends once the job is
terminal and every event up to that state is sent, or once its API key is revoked. A
tenant holds at most `tenant_max_streams` streams per API process (429 past that).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from api.auth import authenticate
from api.deps import SessionDep, SettingsDep, TenantDep, bearer_key
from api.limits import StreamSlots, too_many_streams
from api.lookups import find_job
from api.pagination import DEFAULT_LIMIT, MAX_LIMIT
from api.schemas.jobs import EventPublic, EventsPublic
from swav_service.db import get_sessionmaker
from swav_service.models import MAX_INTEGER, TERMINAL_JOB_STATUSES, Job, JobEvent

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

KEEPALIVE_S = 15.0  # proxies commonly drop connections idle for 30-60 s
SSE_BATCH = 500


def _status_and_events(
    job_id: str, after: int, limit: int, key: str | None = None
) -> tuple[str | None, list[EventPublic]]:
    """(job status, up to `limit` events with seq > after), in a short session of its own;
    status None when the job is gone or `key`, if given, is no longer valid.

    The status is read first: a terminal status is committed together with its final
    event, so once it is seen, the events read next include everything up to it.
    """
    with get_sessionmaker()() as session:
        if key is not None and authenticate(session, key) is None:
            return None, []
        status = session.scalar(select(Job.status).where(Job.id == job_id))
        rows = session.scalars(
            select(JobEvent)
            .where(JobEvent.job_id == job_id, JobEvent.seq > after)
            .order_by(JobEvent.seq)
            .limit(limit)
        ).all()
        return status, [EventPublic.from_row(r) for r in rows]


def sse_message(event: EventPublic) -> str:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


async def event_stream(
    job_id: str, after: int, poll_s: float, key: str | None, release: Callable[[], None]
) -> AsyncIterator[str]:
    """Server-sent events from seq `after` on; ends once the job is terminal and drained,
    or once `key` (None without authentication) is revoked; `release` frees its slot.

    The stream ends only after a poll that saw the terminal status found no new event,
    so events committed just after the status change still get one poll to arrive.
    """
    last_write = time.monotonic()
    try:
        while True:
            status, events = await run_in_threadpool(
                _status_and_events, job_id, after, SSE_BATCH, key
            )
            for event in events:
                yield sse_message(event)
                after = event.seq
            if events:
                last_write = time.monotonic()
                if len(events) == SSE_BATCH:
                    continue
            elif status is None or status in TERMINAL_JOB_STATUSES:
                return
            if time.monotonic() - last_write >= KEEPALIVE_S:
                yield ": keepalive\n\n"
                last_write = time.monotonic()
            await asyncio.sleep(poll_s)
    finally:
        release()


@router.get(
    "/{job_id}/events",
    response_model=EventsPublic,
    responses={
        429: {"description": "The tenant's streams are at their limit (`too_many_streams`); "
              "see Retry-After."},
        200: {
            "content": {"text/event-stream": {}},
            "description": "JSON page, or with `Accept: text/event-stream` a live stream "
            "(`id: <seq>`, `event: <type>`, `data: <EventPublic>`) that ends when the job "
            "is finished.",
        }
    },
)
def list_events(
    job_id: str,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    after: Annotated[
        int, Query(ge=0, le=MAX_INTEGER, description="Only events with a larger seq.")
    ] = 0,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    last_event_id: Annotated[
        int | None,
        Header(alias="Last-Event-ID", ge=0, le=MAX_INTEGER, description="SSE reconnection."),
    ] = None,
) -> Response | EventsPublic:
    """The job's events in order (seq 1, 2, ...); page with `after` = `next_cursor`."""
    find_job(session, tenant, job_id)
    if "text/event-stream" in request.headers.get("accept", ""):
        slots: StreamSlots = request.app.state.stream_slots
        release = slots.acquire(tenant, settings.tenant_max_streams)
        if release is None:
            raise too_many_streams(settings.tenant_max_streams)
        start = last_event_id if last_event_id is not None else after
        key = bearer_key(request.headers.get("authorization")) if settings.auth_enabled else None
        return StreamingResponse(
            event_stream(job_id, start, settings.poll_interval_s, key, release),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            background=BackgroundTask(release),  # also when the stream never started
        )
    _, events = _status_and_events(job_id, after, limit + 1)
    next_cursor = str(events[limit - 1].seq) if len(events) > limit else None
    return EventsPublic(data=events[:limit], next_cursor=next_cursor)
