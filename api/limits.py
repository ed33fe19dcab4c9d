"""Per-tenant limits: active jobs (429), stored bytes (403), embedding and thumbnail request
rates (429), concurrent event streams (429), short tasks in flight (429).

Stored bytes are counted and reserved in swav_service/quota.py (the workers check them
too). The limit checks and the inserts they admit are serialised per tenant
(`quota.lock_tenant`: an advisory lock on PostgreSQL, the write lock on SQLite), so
concurrent creates cannot both take the last slot.
Each request rate is a token bucket per tenant in each API process: with several API
processes behind a balancer, each allows the configured rate.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from fastapi import Request
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.deps import SettingsDep, TenantDep
from api.errors import ApiError
from swav_service.models import (
    ACTIVE_EMBEDDING_JOB_STATUSES,
    ACTIVE_JOB_STATUSES,
    Checkpoint,
    EmbeddingJob,
    Job,
    as_utc,
    utcnow,
)
from swav_service.quota import StorageLimitExceeded, storage_message, stored_bytes
from swav_service.settings import Settings


def active_jobs(session: Session, tenant: str) -> int:
    return int(
        session.scalar(
            select(func.count())
            .select_from(Job)
            .where(Job.tenant == tenant, Job.status.in_(ACTIVE_JOB_STATUSES))
        )
        or 0
    )


def check_active_jobs(session: Session, settings: Settings, tenant: str) -> None:
    """ApiError 429 `too_many_active_jobs` if the tenant may not queue one more job."""
    limit = settings.tenant_max_active_jobs
    if limit and (count := active_jobs(session, tenant)) >= limit:
        raise ApiError(
            429,
            "too_many_active_jobs",
            f"{count} jobs are queued, running or cancelling; the limit is {limit} active "
            "jobs per tenant (SWAV_TENANT_MAX_ACTIVE_JOBS): wait for one to finish or "
            "cancel one",
        )


def storage_error(used: int, limit: int, left: int | None = None) -> ApiError:
    """ApiError 403 `storage_limit_exceeded` naming the usage and the limit; `left`: the
    bytes an upload was allowed, when it was refused for being larger."""
    what = "this upload" if left else None
    return ApiError(403, "storage_limit_exceeded", storage_message(used, limit, what))


def storage_refused(error: StorageLimitExceeded) -> ApiError:
    """The API's 403 for a refused reservation."""
    return ApiError(403, error.code, str(error))


def storage_left(session: Session, settings: Settings, tenant: str) -> int | None:
    """Bytes the tenant may still store (None: no limit); ApiError 403 if none are left."""
    limit = settings.tenant_max_stored_bytes
    if not limit:
        return None
    used = stored_bytes(session, tenant).total
    if used >= limit:
        raise storage_error(used, limit)
    return limit - used


class RateLimiter:
    """Token buckets per key: `rate` tokens a second, at most `burst` saved up.

    `acquire` takes one token or returns how many seconds until one is there. Thread-safe;
    the bucket table is bounded by forgetting full (idle) buckets when it grows.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, at monotonic)
        self._lock = threading.Lock()

    def acquire(self, key: str, now: float | None = None) -> float:
        """0.0 when a token was taken, else the wait in seconds before retrying."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, at = self._buckets.get(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                self._forget_idle(now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate

    def _forget_idle(self, now: float) -> None:
        if len(self._buckets) <= self.max_keys:
            return
        full_after = self.burst / self.rate
        self._buckets = {
            k: v for k, v in self._buckets.items() if now - v[1] < full_after
        }


@dataclass(frozen=True)
class RateLimit:
    """One per-tenant request rate: what it counts, and the settings that bound it."""

    name: str  # the app.state attribute holding its buckets
    what: str  # in the message: "over the limit of 20 <what> per second ..."
    setting: str
    rate: Callable[[Settings], float]
    burst: Callable[[Settings], int]


EMBEDDING_RATE = RateLimit(
    "embedding_rate_limiter", "embedding requests", "SWAV_TENANT_EMBED_RATE_PER_S",
    lambda s: s.tenant_embed_rate_per_s, lambda s: s.tenant_embed_burst,
)
THUMBNAIL_RATE = RateLimit(
    "thumbnail_rate_limiter", "thumbnails", "SWAV_TENANT_THUMBNAILS_PER_S",
    lambda s: s.tenant_thumbnails_per_s, lambda s: s.tenant_thumbnails_burst,
)


def rate_limited(limit: RateLimit, settings: Settings, wait_s: float) -> ApiError:
    """ApiError 429 `rate_limited` with Retry-After: whole seconds, rounded up."""
    retry_after = max(1, math.ceil(wait_s))
    return ApiError(
        429,
        "rate_limited",
        f"over the limit of {limit.rate(settings):g} {limit.what} per "
        f"second per tenant (burst {limit.burst(settings)}, "
        f"{limit.setting}); retry after {retry_after} s",
        headers={"Retry-After": str(retry_after)},
    )


def rate_dependency(limit: RateLimit) -> Callable[..., Coroutine[Any, Any, None]]:
    """A route dependency: ApiError 429 with Retry-After when the tenant is over `limit`.

    Runs before the body is read and before any lookup, so a refused request costs no
    parsing, decoding or query; on the event loop, so the bucket table is made once.
    """

    async def check(request: Request, settings: SettingsDep, tenant: TenantDep) -> None:
        rate = limit.rate(settings)
        if not rate:
            return
        limiter: RateLimiter | None = getattr(request.app.state, limit.name, None)
        if limiter is None:
            limiter = RateLimiter(rate, limit.burst(settings))
            setattr(request.app.state, limit.name, limiter)
        wait_s = limiter.acquire(tenant)
        if wait_s > 0:
            raise rate_limited(limit, settings, wait_s)

    return check


limit_rate = rate_dependency(EMBEDDING_RATE)  # the embedding and neighbours routes
limit_thumbnail_rate = rate_dependency(THUMBNAIL_RATE)


class StreamSlots:
    """Open event streams per tenant in this API process, at most `limit` each."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def acquire(self, tenant: str, limit: int) -> Callable[[], None] | None:
        """A release function (safe to call more than once), or None when the tenant has
        `limit` streams open (0: no limit)."""
        with self._lock:
            if limit and self._open.get(tenant, 0) >= limit:
                return None
            self._open[tenant] = self._open.get(tenant, 0) + 1
        released = threading.Event()

        def release() -> None:
            with self._lock:
                if not released.is_set():
                    released.set()
                    self._open[tenant] -= 1
                    if not self._open[tenant]:
                        del self._open[tenant]

        return release


STREAM_RETRY_AFTER_S = 5


def too_many_streams(limit: int) -> ApiError:
    return ApiError(
        429,
        "too_many_streams",
        f"the tenant has {limit} event streams open in this API process, the limit "
        f"(SWAV_TENANT_MAX_STREAMS); close one, or read GET /v1/jobs/{{id}}/events as JSON "
        f"pages; retry after {STREAM_RETRY_AFTER_S} s",
        headers={"Retry-After": str(STREAM_RETRY_AFTER_S)},
    )


def evaluation_in_flight(row: Checkpoint, settings: Settings) -> bool:
    """Whether the checkpoint's quality report is queued or being computed (a request
    older than `short_task_stale_s` counts as lost: it may be asked again)."""
    requested = row.evaluation_requested_at
    stale_before = utcnow() - timedelta(seconds=settings.short_task_stale_s)
    return requested is not None and as_utc(requested) > stale_before


def short_tasks_left(session: Session, settings: Settings, tenant: str) -> None:
    """ApiError 429 `too_many_tasks` when the tenant has `tenant_max_short_tasks` quality
    reports and embedding jobs in flight, so that one tenant cannot fill the short queue
    that every tenant's uploads wait in."""
    limit = settings.tenant_max_short_tasks
    if not limit:
        return
    stale_before = utcnow() - timedelta(seconds=settings.short_task_stale_s)
    evaluations = session.scalar(
        select(func.count())
        .select_from(Checkpoint)
        .join(Job, Job.id == Checkpoint.job_id)
        .where(Job.tenant == tenant, Checkpoint.evaluation_requested_at > stale_before)
    ) or 0
    embeddings = session.scalar(
        select(func.count()).where(
            EmbeddingJob.tenant == tenant,
            EmbeddingJob.status.in_(ACTIVE_EMBEDDING_JOB_STATUSES),
        )
    ) or 0
    if evaluations + embeddings >= limit:
        raise ApiError(
            429,
            "too_many_tasks",
            f"the tenant has {evaluations} quality reports and {embeddings} embedding jobs "
            f"in flight, the limit of {limit} (SWAV_TENANT_MAX_SHORT_TASKS); retry once some "
            "have finished",
            headers={"Retry-After": str(SHORT_TASK_RETRY_AFTER_S)},
        )


SHORT_TASK_RETRY_AFTER_S = 30
