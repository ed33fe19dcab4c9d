"""Jobs: create (idempotent), list, read, cancel, resume, and the event log (JSON or SSE).

A job's state lives in the database; the broker message only says "look at job X", and
is sent after the commit so a worker never looks before the row exists. The worker moves
a job queued -> running -> succeeded/failed/cancelled; the API moves it queued ->
cancelled, running -> cancelling, and (resume, the one exception to "terminal states
never change") cancelled/failed -> queued.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.limits import check_active_jobs, lock_tenant, storage_left
from api.lookups import find_dataset, find_job
from api.pagination import DEFAULT_LIMIT, MAX_LIMIT, CursorQuery, LimitQuery, paginate
from api.planning import Plan, estimates, plan_job
from api.schemas import (
    CostEstimatePublic,
    EventPublic,
    EventsPublic,
    JobCreate,
    JobPlanPublic,
    JobPublic,
    JobsPublic,
)
from swav_service.db import get_sessionmaker
from swav_service.dispatch import enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.models import (
    JOB_STATUSES,
    MAX_INTEGER,
    TERMINAL_JOB_STATUSES,
    IdempotencyRecord,
    Job,
    JobEvent,
    new_id,
    utcnow,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_METADATA_BYTES = 16 * 1024
KEEPALIVE_S = 15.0  # proxies commonly drop connections idle for 30-60 s
SSE_BATCH = 500
RESUMABLE = ("cancelled", "failed")

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retries with the same key and body replay the first answer.",
    ),
]


def request_hash(payload: JobCreate) -> str:
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _replay(record: IdempotencyRecord, digest: str) -> JSONResponse:
    if record.request_hash != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request body; use a new key",
            "Idempotency-Key",
        )
    return JSONResponse(record.response, status_code=record.status_code)


def _enqueue_or_fail(session: Session, job_id: str) -> None:
    """Send the job to the broker (one message per node, to the queue of its size); if
    it is unreachable, fail the job and answer 503.

    The job is failed rather than left queued: nothing would ever pick it up. It can be
    resumed once the broker is back.
    """
    try:
        job = session.get(Job, job_id)
        enqueue_job(job_id, job.gpus if job else 1, job.nodes if job else 1)
    except Exception as exc:
        message = "the task broker was unreachable; resume the job once it is back"
        change_status(
            session,
            job_id,
            "failed",
            expected=("queued",),
            error_code="broker_unavailable",
            error_message=message,
        )
        session.commit()
        raise ApiError(503, "broker_unavailable", f"job {job_id} failed: {message}") from exc


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={
        200: {"model": JobPlanPublic, "description": "`dry_run`: the plan; nothing queued."},
        403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."},
        404: {"description": "No such dataset."},
        409: {"description": "`dataset_not_ready`, or `idempotency_conflict`."},
        422: {"description": "`invalid_config` (param names the field) or `invalid_request`."},
        429: {"description": "The tenant has its limit of active jobs (`too_many_active_jobs`)."},
    },
)
def create_job(
    payload: JobCreate,
    session: SessionDep,
    settings: SettingsDep,
    tenant: TenantDep,
    idempotency_key: IdempotencyKey = None,
) -> Any:
    """Submit a training job: `preset` (auto by default) and then `config` overrides give
    the TrainConfig. With `dry_run`, answer the plan instead and queue nothing."""
    if payload.dry_run:
        answer = plan_only(payload, session, settings, tenant)
        return JSONResponse(answer.model_dump(mode="json"), status_code=200)
    digest = request_hash(payload)
    if idempotency_key is not None:
        record = session.get(IdempotencyRecord, (tenant, idempotency_key))
        if record is not None:
            return _replay(record, digest)

    dataset = find_dataset(session, tenant, payload.dataset_id)
    plan = plan_job(session, settings, dataset, payload.preset, payload.overrides(),
                    payload.resources.gpus, payload.resources.nodes)
    config = plan.config
    world_size = payload.resources.gpus * payload.resources.nodes
    if config.batch_size % world_size:
        raise ApiError(
            422,
            "invalid_request",
            f"resources: config.batch_size={config.batch_size} does not split over "
            f"{world_size} ranks (gpus x nodes); use a batch size that is a multiple of "
            f"{world_size}, or other resources",
            "resources",
        )
    if payload.metadata is not None and len(json.dumps(payload.metadata)) > MAX_METADATA_BYTES:
        raise ApiError(
            422,
            "invalid_request",
            f"metadata: at most {MAX_METADATA_BYTES} bytes of JSON",
            "metadata",
        )
    lock_tenant(session, tenant)  # until commit: the count below stays true for the insert
    check_active_jobs(session, settings, tenant)
    storage_left(session, settings, tenant)
    dataset = find_dataset(session, tenant, payload.dataset_id, lock=True)
    if dataset.status != "ready":
        raise ApiError(
            409,
            "dataset_not_ready",
            f"dataset {dataset.id} is {dataset.status}"
            + ("; wait until it is ready" if dataset.status == "validating" else "")
            + (f": {dataset.error_message}" if dataset.error_message else ""),
            "dataset_id",
        )

    if payload.keep_best_by is not None and not dataset.classes:
        raise ApiError(
            422,
            "invalid_request",
            f"keep_best_by needs a labelled dataset, and dataset {dataset.id} has no class "
            "folders; upload images as <class>/<image> or leave keep_best_by out",
            "keep_best_by",
        )

    job = Job(
        id=new_id("job"),
        tenant=tenant,
        dataset_id=dataset.id,
        name=payload.name,
        preset=plan.preset,
        config=config.model_dump(mode="json"),
        user_metadata=payload.metadata,
        status="queued",
        step=0,
        epoch=0,
        epochs=config.epochs,
        attempt=0,
        compute_seconds=0.0,
        keep_best_by=payload.keep_best_by,
        max_attempts=payload.max_attempts,
        max_runtime_s=payload.max_runtime_s,
        gpus=payload.resources.gpus,
        nodes=payload.resources.nodes,
    )
    session.add(job)
    session.flush()
    if plan.reasons:
        append_event(session, job.id, "plan", {"reasons": plan.reasons,
                                               "dataset_stats": _stats(plan)})
    append_event(session, job.id, "state", {"status": "queued"})
    session.flush()
    body = JobPublic.from_row(job).model_dump(mode="json")
    if idempotency_key is not None:
        session.add(
            IdempotencyRecord(
                tenant=tenant,
                key=idempotency_key,
                request_hash=digest,
                status_code=201,
                response=body,
            )
        )
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as it did.
        session.rollback()
        if idempotency_key is None:
            raise
        record = session.get(IdempotencyRecord, (tenant, idempotency_key))
        if record is None:
            raise
        return _replay(record, digest)
    try:
        _enqueue_or_fail(session, job.id)
    except ApiError:
        if idempotency_key is not None:  # let a retry with the same key create a new job
            session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == idempotency_key
                )
            )
            session.commit()
        raise
    return JSONResponse(body, status_code=201)


def _stats(plan: Plan) -> dict[str, Any] | None:
    return plan.stats.as_dict() if plan.stats else None


def plan_only(payload: JobCreate, session: Session, settings: Any, tenant: str) -> JobPlanPublic:
    """The dry run: the resolved config, auto's reasons and the estimates; nothing stored."""
    dataset = find_dataset(session, tenant, payload.dataset_id)
    if dataset.status != "ready":
        raise ApiError(409, "dataset_not_ready", f"dataset {dataset.id} is {dataset.status}",
                       "dataset_id")
    gpus, nodes = payload.resources.gpus, payload.resources.nodes
    plan = plan_job(session, settings, dataset, payload.preset, payload.overrides(), gpus, nodes)
    return JobPlanPublic(
        preset=plan.preset,
        config=plan.config.model_dump(mode="json"),
        reasons=plan.reasons,
        dataset_stats=_stats(plan),
        estimates=[
            CostEstimatePublic(**e)
            for e in estimates(plan, dataset.num_images or 0, gpus * nodes)
        ],
    )


@router.get("", response_model=JobsPublic)
def list_jobs(
    session: SessionDep,
    tenant: TenantDep,
    status: Annotated[
        str | None, Query(description="Comma-separated statuses, e.g. queued,running.")
    ] = None,
    limit: LimitQuery = DEFAULT_LIMIT,
    cursor: CursorQuery = None,
) -> JobsPublic:
    """The tenant's jobs, newest first, optionally only those in some statuses."""
    statement = select(Job).where(Job.tenant == tenant)
    if status is not None:
        wanted = [s.strip() for s in status.split(",") if s.strip()]
        unknown = [s for s in wanted if s not in JOB_STATUSES]
        if unknown or not wanted:
            problem = f"{unknown[0][:50]!r} is not a job status" if unknown else "it is empty"
            raise ApiError(
                422,
                "invalid_request",
                f"status: {problem}; use one or more of {', '.join(JOB_STATUSES)}",
                "status",
            )
        statement = statement.where(Job.status.in_(wanted))
    rows, next_cursor = paginate(session, statement, Job, limit, cursor)
    return JobsPublic(data=[JobPublic.from_row(r) for r in rows], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic)
def get_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    return JobPublic.from_row(find_job(session, tenant, job_id))


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses={409: {"description": "The job already finished (`job_finished`)."}},
)
def cancel_job(job_id: str, session: SessionDep, tenant: TenantDep) -> JobPublic:
    """Queued: cancelled at once. Running: `cancelling` until the worker stops it at the
    next step (a checkpoint is kept, so it can be resumed). Cancelling: unchanged."""
    job = find_job(session, tenant, job_id)
    # change_status is a compare-and-set; if the worker moved the job in between, look again.
    for _ in range(5):
        if job.status in TERMINAL_JOB_STATUSES:
            raise ApiError(
                409, "job_finished", f"job {job_id} already finished as {job.status}", "job_id"
            )
        if job.status == "cancelling":
            break
        if job.status == "queued":
            moved = change_status(session, job_id, "cancelled", expected=("queued",))
        else:
            moved = change_status(
                session, job_id, "cancelling", expected=("running",), cancel_requested_at=utcnow()
            )
        session.commit()
        session.refresh(job)
        if moved:
            break
    return JobPublic.from_row(job)


def ensure_dataset_usable(session: Session, tenant: str, dataset_id: str) -> None:
    """ApiError 409 `dataset_not_ready` unless the job's dataset can still be trained on."""
    try:
        dataset = find_dataset(session, tenant, dataset_id)
    except ApiError as exc:
        raise ApiError(
            409,
            "dataset_not_ready",
            f"the job's dataset {dataset_id} was deleted; create a new job on another dataset",
            "dataset_id",
        ) from exc
    if dataset.status != "ready":
        raise ApiError(
            409, "dataset_not_ready", f"dataset {dataset_id} is {dataset.status}", "dataset_id"
        )


@router.post(
    "/{job_id}/resume",
    status_code=202,
    response_model=JobPublic,
    responses={
        200: {"model": JobPlanPublic, "description": "`dry_run`: the plan; nothing queued."},
        403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."},
        409: {"description": "`job_not_resumable`, or `dataset_not_ready`."},
        429: {"description": "The tenant has its limit of active jobs (`too_many_active_jobs`)."},
    },
)
def resume_job(
    job_id: str, session: SessionDep, settings: SettingsDep, tenant: TenantDep
) -> JobPublic:
    """Queue a cancelled or failed job again; it continues from its latest checkpoint."""
    job = find_job(session, tenant, job_id)
    if job.status not in RESUMABLE:
        raise ApiError(
            409,
            "job_not_resumable",
            f"job {job_id} is {job.status}; only cancelled or failed jobs can be resumed",
            "job_id",
        )
    ensure_dataset_usable(session, tenant, job.dataset_id)
    lock_tenant(session, tenant)
    check_active_jobs(session, settings, tenant)
    storage_left(session, settings, tenant)
    # The one move out of a terminal state, so not change_status: a compare-and-set of its own.
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(RESUMABLE))
        .values(
            status="queued",
            error_code=None,
            error_message=None,
            finished_at=None,
            cancel_requested_at=None,
            eta_s=None,
            updated_at=utcnow(),
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        session.rollback()
        raise ApiError(409, "job_not_resumable", f"job {job_id} changed state; retry", "job_id")
    append_event(session, job_id, "state", {"status": "queued", "resumed": True})
    session.commit()
    _enqueue_or_fail(session, job_id)
    session.refresh(job)
    return JobPublic.from_row(job)


# --------------------------------------------------------------------------- events


def _fetch_events(job_id: str, after: int, limit: int) -> tuple[str | None, list[EventPublic]]:
    """(job status, up to `limit` events with seq > after), in a short session of its own.

    The status is read first: a terminal status is committed together with its final
    event, so once it is seen, the events read next include everything up to it.
    """
    with get_sessionmaker()() as session:
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


async def event_stream(job_id: str, after: int, poll_s: float) -> AsyncIterator[str]:
    """Server-sent events from seq `after` on; ends once the job is terminal and drained.

    The stream ends only after a poll that saw the terminal status found no new event,
    so events committed just after the status change still get one poll to arrive.
    """
    last_write = time.monotonic()
    while True:
        status, events = await run_in_threadpool(_fetch_events, job_id, after, SSE_BATCH)
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


@router.get(
    "/{job_id}/events",
    response_model=EventsPublic,
    responses={
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
        start = last_event_id if last_event_id is not None else after
        return StreamingResponse(
            event_stream(job_id, start, settings.poll_interval_s),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    _, events = _fetch_events(job_id, after, limit + 1)
    next_cursor = str(events[limit - 1].seq) if len(events) > limit else None
    return EventsPublic(data=events[:limit], next_cursor=next_cursor)
