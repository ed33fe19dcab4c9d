"""Jobs: create (idempotent), list, read, cancel and resume.

A job's state lives in the database; the broker message only says "look at job X", and
is sent after the commit so a worker never looks before the row exists. The worker moves
a job queued -> running -> succeeded/failed/cancelled; the API moves it queued ->
cancelled, running -> cancelling, and (resume, the one exception to "terminal states
never change") cancelled/failed -> queued. Its event log is `api.routes.events`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.deps import SessionDep, SettingsDep, TenantDep
from api.errors import ApiError
from api.idempotency import (
    IdempotencyKey,
    forget_answer,
    previous_answer,
    remember_answer,
    request_hash,
)
from api.limits import check_active_jobs, storage_left
from api.lookups import find_dataset, find_job
from api.pagination import DEFAULT_LIMIT, CursorQuery, LimitQuery, paginate
from api.planning import Plan, estimates, plan_job
from api.responses import ACTIVE_JOBS_LIMIT, STORAGE_LIMIT, Responses
from api.schemas.jobs import CostEstimatePublic, JobCreate, JobPlanPublic, JobPublic, JobsPublic
from api.start_from import check_start_from
from swav_service.dispatch import enqueue_job
from swav_service.job_state import append_event, change_status
from swav_service.models import (
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    Job,
    new_id,
    utcnow,
)
from swav_service.quota import lock_tenant

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_METADATA_BYTES = 16 * 1024
RESUMABLE = ("cancelled", "failed")
DRY_RUN_PLAN: Responses = {
    200: {"model": JobPlanPublic, "description": "`dry_run`: the plan; nothing queued."}
}


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
        **DRY_RUN_PLAN,
        **STORAGE_LIMIT,
        404: {"description": "No such dataset, or start_from's checkpoint or weights."},
        409: {"description": "`dataset_not_ready`, or `idempotency_conflict`."},
        410: {"description": "`checkpoint_gone`: start_from's checkpoint left the disk."},
        422: {"description": "`invalid_config` (param names the field), `invalid_request`, "
              "or `invalid_weights` (start_from of another backbone)."},
        **ACTIVE_JOBS_LIMIT,
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
    replayed = previous_answer(session, tenant, idempotency_key, digest)
    if replayed is not None:
        return replayed

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
    start_checkpoint_id, start_weights_id = (None, None)
    if payload.start_from is not None:
        start_checkpoint_id, start_weights_id = check_start_from(
            session, settings, tenant, payload.start_from, config
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
        start_checkpoint_id=start_checkpoint_id,
        start_weights_id=start_weights_id,
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
        remember_answer(session, tenant, idempotency_key, digest, 201, body)
    try:
        session.commit()
    except IntegrityError:
        # A concurrent request with the same key committed first: answer as it did.
        session.rollback()
        replayed = previous_answer(session, tenant, idempotency_key, digest)
        if replayed is None:
            raise
        return replayed
    try:
        _enqueue_or_fail(session, job.id)
    except ApiError:
        if idempotency_key is not None:  # let a retry with the same key create a new job
            forget_answer(session, tenant, idempotency_key)
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
    if payload.start_from is not None:
        check_start_from(session, settings, tenant, payload.start_from, plan.config)
    return JobPlanPublic(
        preset=plan.preset,
        config=plan.config,
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
        **DRY_RUN_PLAN,
        **STORAGE_LIMIT,
        409: {"description": "`job_not_resumable`, or `dataset_not_ready`."},
        **ACTIVE_JOBS_LIMIT,
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
            attempt=0,  # a fresh budget of max_attempts: the user asked for another try
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
