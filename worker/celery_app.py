"""The Celery app. The broker only says "look at job X"; the database holds the state.

Two queues: `short` (dataset ingestion, batch embedding, checkpoint evaluation) and
`train`, served by separate worker processes so that a short task never waits behind a
training run. Training workers take one task at a time (prefetch 1, acks late).
"""

from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings

INGEST_TASK = "worker.tasks.ingest_dataset"
TRAIN_TASK = "worker.tasks.run_job"
EMBED_TASK = "worker.tasks.embed_dataset"
EVAL_TASK = "worker.tasks.evaluate_checkpoint"


def broker_options(settings: Settings) -> dict[str, object]:
    if settings.broker_url is not None:
        return {"visibility_timeout": 12 * 3600}
    folder = settings.broker_folder
    for sub in ("queue", "processed", "control"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(folder / "queue"),
        "data_folder_out": str(folder / "queue"),
        "processed_folder": str(folder / "processed"),
        "control_folder": str(folder / "control"),
        "store_processed": False,
    }


def create_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("swav_service", broker=settings.resolved_broker_url, include=["worker.tasks"])
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        task_routes={
            INGEST_TASK: {"queue": settings.short_queue},
            TRAIN_TASK: {"queue": settings.train_queue},
            EMBED_TASK: {"queue": settings.short_queue},
            EVAL_TASK: {"queue": settings.short_queue},
        },
        worker_hijack_root_logger=False,
    )
    return app


app = create_celery()
