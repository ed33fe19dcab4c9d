"""Prometheus metrics at `GET /metrics`: request latency, jobs, queues, workers, embeddings.

Each app has its own `CollectorRegistry` (two apps in one process, as in tests, do not
share or clash). Request latency is the one metric recorded as requests happen; the rest
is read when Prometheus scrapes, so it is never stale and needs nothing from the workers:

- jobs by status, the training durations of finished jobs, batch embedding rows, and
  worker heartbeats come from the database (a handful of aggregate queries);
- queue depth counts what waits in the database per queue, and with a Redis broker also
  the length of the queue's Redis lists (what Celery has not yet handed to a worker);
- embeddings served are this API process's counters (`api.embedding_service`).

Database-backed values are global, so every API replica reports the same ones: scrape
one replica for them, or aggregate with max(). If the database or the broker cannot be
read, `swav_database_up` / `swav_broker_up` say 0 and the rest of the page still answers.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Histogram,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from sqlalchemy import case, func, select
from sqlalchemy.orm import Session
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from swav_service.db import get_sessionmaker
from swav_service.models import (
    JOB_STATUSES,
    TERMINAL_JOB_STATUSES,
    Dataset,
    EmbeddingJob,
    Job,
    Worker,
    as_utc,
    utcnow,
)
from swav_service.settings import Settings, get_settings

log = logging.getLogger(__name__)

router = APIRouter(tags=["health"])

# Seconds until the response starts; the tail covers large uploads (read before answering).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# Training runs last from seconds (cpu-tiny) to days (imagenet-800ep).
JOB_DURATION_BUCKETS = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600,
                        86400, 3 * 86400, 7 * 86400)
# Heartbeat rows of workers gone longer than this are left out: worker names carry a pid,
# so old rows would otherwise add series forever.
WORKER_WINDOW = timedelta(days=1)
UNMATCHED_ROUTE = "unmatched"  # requests no route matched: never the raw path
BROKER_TIMEOUT_S = 1.0
# kombu's Redis transport keeps a queue's messages in one list per priority step
# (kombu.transport.redis: PRIORITY_STEPS and Channel.sep); priority 0 is the bare name.
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
KOMBU_PRIORITY_SEP = "\x06\x16"


def route_label(scope: Scope) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`), so ids do not become labels."""
    route = scope.get("route")
    return getattr(route, "path_format", None) or getattr(route, "path", None) or UNMATCHED_ROUTE


class RequestLatency:
    """ASGI middleware: observe each HTTP request in `histogram` (method, route, status).

    Timed until the response starts, so a live event stream or a large download counts
    its time to first byte, not how long the client keeps reading. A request that ends
    in an exception before any response counts as 500, which is what the app answers.
    """

    def __init__(self, app: ASGIApp, histogram: Histogram) -> None:
        self.app = app
        self.histogram = histogram

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        observed = False

        def observe(status: int) -> None:
            nonlocal observed
            observed = True
            self.histogram.labels(scope["method"], route_label(scope), str(status)).observe(
                time.perf_counter() - start
            )

        async def timed_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not observed:
                observe(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            if not observed:
                observe(500)


def broker_queue_depths(url: str, queues: list[str]) -> dict[str, int]:
    """Messages waiting in each queue's Redis lists: every priority step, and the queue's
    sized variants too (`train.gpus2` holds 2-rank jobs, swav_service/dispatch.py)."""
    import redis

    client = redis.Redis.from_url(
        url, socket_timeout=BROKER_TIMEOUT_S, socket_connect_timeout=BROKER_TIMEOUT_S
    )
    try:
        depths = {}
        for queue in queues:
            keys = {f"{queue}{KOMBU_PRIORITY_SEP}{step}" if step else queue
                    for step in KOMBU_PRIORITY_STEPS}
            variants = client.scan_iter(match=f"{glob_escape(queue)}.*", _type="list")
            keys.update(key.decode() for key in variants)
            pipe = client.pipeline(transaction=False)
            for key in sorted(keys):
                pipe.llen(key)
            depths[queue] = int(sum(pipe.execute()))
        return depths
    finally:
        client.close()


def glob_escape(text: str) -> str:
    """`text` as a literal in a Redis MATCH pattern."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


class ServiceCollector(Collector):
    """Reads the service's state when scraped (see the module docstring)."""

    def __init__(
        self,
        settings: Callable[[], Settings] = get_settings,
        embedding_stats: Callable[[], dict[str, Any] | None] = lambda: None,
    ) -> None:
        self.settings = settings
        self.embedding_stats = embedding_stats

    def collect(self) -> Iterator[Metric]:
        settings = self.settings()
        depth = GaugeMetricFamily(
            "swav_queue_depth",
            "Work waiting per queue. source=database: queued jobs (train queue); datasets "
            "being validated and queued embedding jobs (short queue). source=broker: "
            "messages in the broker's queue not yet taken by a worker (Redis only).",
            labels=["queue", "source"],
        )
        database_up = GaugeMetricFamily(
            "swav_database_up", "1 if the database answered this scrape's queries, else 0."
        )
        families: list[Metric] = []
        try:
            with get_sessionmaker()() as session:
                families = list(self._database(session, settings, depth))
        except Exception:  # a scrape must answer; the gauge says what is missing
            log.warning("metrics: the database could not be read", exc_info=True)
            database_up.add_metric([], 0)
        else:
            database_up.add_metric([], 1)
        yield database_up
        yield from families
        yield from self._broker(settings, depth)
        yield depth
        yield from self._embeddings()

    def _database(
        self, session: Session, settings: Settings, depth: GaugeMetricFamily
    ) -> Iterator[Metric]:
        by_status = dict(
            session.execute(select(Job.status, func.count()).group_by(Job.status)).tuples().all()
        )
        jobs = GaugeMetricFamily("swav_jobs", "Jobs in each status.", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], by_status.get(status, 0))
        yield jobs

        validating = session.scalar(
            select(func.count()).select_from(Dataset).where(Dataset.status == "validating")
        )
        embeddings_queued = session.scalar(
            select(func.count()).select_from(EmbeddingJob).where(EmbeddingJob.status == "queued")
        )
        depth.add_metric([settings.train_queue, "database"], by_status.get("queued", 0))
        depth.add_metric(
            [settings.short_queue, "database"], (validating or 0) + (embeddings_queued or 0)
        )

        yield self._durations(session)
        rows = session.scalar(
            select(func.coalesce(func.sum(EmbeddingJob.num_rows), 0)).where(
                EmbeddingJob.status == "succeeded"
            )
        )
        yield CounterMetricFamily(
            "swav_batch_embedding_rows",
            "Rows written by succeeded batch embedding jobs (POST /v1/jobs/{id}/embeddings).",
            value=rows or 0,
        )
        yield from self._workers(session)

    def _durations(self, session: Session) -> Metric:
        """Training seconds (all attempts) of finished jobs, by final status."""
        seconds = Job.compute_seconds
        # Cumulative bucket counts straight from SQL: one pass over the finished jobs.
        statement = (
            select(
                Job.status,
                func.count(),
                func.coalesce(func.sum(seconds), 0.0),
                *(func.sum(case((seconds <= bound, 1), else_=0)) for bound in JOB_DURATION_BUCKETS),
            )
            .where(Job.status.in_(TERMINAL_JOB_STATUSES))
            .group_by(Job.status)
        )
        found = {row[0]: row[1:] for row in session.execute(statement).all()}
        family = HistogramMetricFamily(
            "swav_job_duration_seconds",
            "Training time of finished jobs (compute seconds over all attempts), by status.",
            labels=["status"],
        )
        empty = (0, 0.0) + (0,) * len(JOB_DURATION_BUCKETS)
        for status in sorted(TERMINAL_JOB_STATUSES):
            count, total, *cumulative = found.get(status, empty)
            buckets = [
                (str(float(bound)), int(n or 0))
                for bound, n in zip(JOB_DURATION_BUCKETS, cumulative, strict=True)
            ]
            buckets.append(("+Inf", int(count)))
            family.add_metric([status], buckets, float(total or 0.0))
        return family

    def _workers(self, session: Session) -> Iterator[Metric]:
        seen = GaugeMetricFamily(
            "swav_worker_last_seen_timestamp_seconds",
            "A worker's last heartbeat (Unix time), for workers seen in the last day; "
            "alert on time() - this.",
            labels=["worker", "queues"],
        )
        busy = GaugeMetricFamily(
            "swav_worker_busy", "1 while the worker holds a job, else 0.", labels=["worker"]
        )
        since = utcnow() - WORKER_WINDOW
        for worker in session.scalars(select(Worker).where(Worker.last_seen_at >= since)):
            seen.add_metric([worker.name, worker.queues], as_utc(worker.last_seen_at).timestamp())
            busy.add_metric([worker.name], 1 if worker.job_id else 0)
        yield seen
        yield busy

    def _broker(self, settings: Settings, depth: GaugeMetricFamily) -> Iterator[Metric]:
        url = settings.resolved_broker_url
        if not url.startswith(("redis://", "rediss://", "unix://")):
            return
        up = GaugeMetricFamily("swav_broker_up", "1 if the Redis broker answered, else 0.")
        try:
            depths = broker_queue_depths(url, [settings.train_queue, settings.short_queue])
        except Exception:
            log.warning("metrics: the broker could not be read", exc_info=True)
            up.add_metric([], 0)
        else:
            up.add_metric([], 1)
            for queue, length in depths.items():
                depth.add_metric([queue, "broker"], length)
        yield up

    def _embeddings(self) -> Iterator[Metric]:
        stats = self.embedding_stats() or {}
        for name, key, doc in (
            ("swav_embeddings_served", "items", "Images embedded by POST /v1/embeddings."),
            ("swav_embedding_requests", "requests", "Embedding requests answered."),
            ("swav_embedding_overloaded", "overloaded", "Embedding requests refused (503)."),
            ("swav_embedding_forward_seconds", "forward_s", "Seconds in embedding forwards."),
        ):
            yield CounterMetricFamily(name, f"{doc} This API process.", value=stats.get(key, 0))


def install_metrics(app: FastAPI) -> None:
    """Give `app` its registry, the latency middleware and `GET /metrics`."""
    registry = CollectorRegistry()
    latency = Histogram(
        "swav_http_request_duration_seconds",
        "Seconds from a request's arrival to its response's start, by route template.",
        ["method", "route", "status"],
        buckets=LATENCY_BUCKETS,
        registry=registry,
    )

    def embedding_stats() -> dict[str, Any] | None:
        service = getattr(app.state, "embedding_service", None)  # made on first use
        return service.stats_dict() if service is not None else None

    registry.register(ServiceCollector(get_settings, embedding_stats))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    app.state.metrics_registry = registry
    app.add_middleware(RequestLatency, histogram=latency)
    app.include_router(router)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {}, "application/openmetrics-text": {}},
            "description": "Prometheus text format, or OpenMetrics when the Accept header "
            "asks for it.",
        }
    },
)
def metrics(request: Request) -> Response:
    """Prometheus metrics, read at each scrape (Prometheus sends no API key)."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    # The format the scraper asks for: prometheus_client's own HTTP handlers do the same.
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), headers={"Content-Type": content_type})
