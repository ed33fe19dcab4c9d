"""How work reaches the workers: task names, queues, the Celery configuration, and the
functions that send a task.

The broker only says "look at X"; the database holds the state. Two kinds of queue:
`short` (dataset ingestion, batch embedding, checkpoint evaluation) and `train`, served by
separate worker processes so that a short task never waits behind a training run. A
training job of N ranks per node goes to `train` (N = 1) or `train.gpusN`, and a worker
that can run R ranks reads the queues for 1..R, so it is never handed a job too large.

The API and the workers both send tasks (a submit; a requeue after a lost lease or node;
an evaluation per checkpoint), and the worker process also runs them. Every Celery app of
the service is made by `create_app`, from `celery_config`, so a message is routed and
serialised the way the worker expects. Tasks are sent by name: the sender never imports
the worker's task code (or torch). The producer is built on the first send, not at
import, so importing the API neither reads the settings nor touches a broker.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from swav_service.settings import Settings, get_settings

APP_NAME = "swav_service"
# The names the worker's tasks are registered under (worker/tasks.py); messages already
# in a broker carry them, so they keep the module path they had.
INGEST_TASK = "worker.tasks.ingest_dataset"
TRAIN_TASK = "worker.tasks.run_job"
EMBED_TASK = "worker.tasks.embed_dataset"
EVAL_TASK = "worker.tasks.evaluate_checkpoint"
# Celery's Redis transport redelivers a message not acked within this time; training
# tasks ack late, when the run ends.
REDIS_VISIBILITY_TIMEOUT_S = 12 * 3600


def train_queue_for(settings: Settings, gpus: int) -> str:
    """The queue of jobs with `gpus` ranks per node: `train` for 1, else `train.gpus{N}`."""
    return settings.train_queue if gpus <= 1 else f"{settings.train_queue}.gpus{gpus}"


def train_queues(settings: Settings, ranks: int) -> list[str]:
    """The queues a worker that can run `ranks` ranks consumes: every size it fits."""
    return [train_queue_for(settings, n) for n in range(1, max(1, ranks) + 1)]


def prepare_broker(settings: Settings) -> None:
    """Create the folders of Celery's filesystem transport (embedded mode, no broker URL),
    which the transport and the API's readiness probe expect to exist; nothing otherwise."""
    if settings.broker_url is not None:
        return
    for sub in ("queue", "processed", "control"):
        (settings.broker_folder / sub).mkdir(parents=True, exist_ok=True)


def broker_options(settings: Settings) -> dict[str, object]:
    """Celery's `broker_transport_options`: Redis's visibility timeout, or the filesystem
    transport's folders (created here). One queue folder serves every queue."""
    if settings.broker_url is not None:
        return {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
    prepare_broker(settings)
    folder = settings.broker_folder
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The configuration every Celery app of the service gets (`app.conf.update`).

    JSON only; no results (the database holds them); a training worker takes one task at
    a time and acks it when it ends (prefetch 1, acks late); each task is routed to its
    queue, so a sender need not name it (training names the queue of the job's size).
    """
    return {
        "broker_transport_options": broker_options(settings),
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": False,
        "worker_prefetch_multiplier": 1,
        "task_routes": {
            INGEST_TASK: {"queue": settings.short_queue},
            TRAIN_TASK: {"queue": settings.train_queue},
            EMBED_TASK: {"queue": settings.short_queue},
            EVAL_TASK: {"queue": settings.short_queue},
        },
        "worker_hijack_root_logger": False,
    }


def create_app(
    settings: Settings, include: list[str] | None = None, set_as_current: bool = True
) -> Celery:
    """A Celery app on the settings' broker with `celery_config`. The worker passes its
    task modules as `include`; a producer passes none (it sends by name)."""
    app = Celery(
        APP_NAME,
        broker=settings.resolved_broker_url,
        include=include,
        set_as_current=set_as_current,
    )
    app.conf.update(celery_config(settings))
    return app


_producer: Celery | None = None
_producer_lock = threading.Lock()


def producer() -> Celery:
    """The process's sending app, built on first use from the (cached) settings.

    Not made Celery's current app: in a worker process that stays the worker's own.
    """
    global _producer
    with _producer_lock:
        if _producer is None:
            _producer = create_app(get_settings(), set_as_current=False)
        return _producer


def enqueue_ingest(dataset_id: str) -> None:
    """Ask a short worker to extract and validate dataset `dataset_id`."""
    producer().send_task(INGEST_TASK, args=[dataset_id])


def enqueue_job(job_id: str, gpus: int = 1, messages: int = 1) -> None:
    """Send `messages` "train job X" messages to the queue of jobs with `gpus` ranks per
    node: one per node of a multi-node job (each worker that reads one claims a node)."""
    queue = train_queue_for(get_settings(), gpus)
    app = producer()
    for _ in range(messages):
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue)


def enqueue_embedding(embedding_job_id: str) -> None:
    """Ask a short worker to embed a whole dataset (embedding job `embedding_job_id`)."""
    producer().send_task(EMBED_TASK, args=[embedding_job_id])


def enqueue_evaluation(checkpoint_id: str) -> None:
    """Ask a short worker for checkpoint `checkpoint_id`'s quality report."""
    producer().send_task(EVAL_TASK, args=[checkpoint_id])
