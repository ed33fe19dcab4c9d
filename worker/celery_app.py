"""The Celery app. The broker only says "look at job X"; the database holds the state.

Two queues: `short` (dataset ingestion, batch embedding, checkpoint evaluation) and
`train`, served by separate worker processes so that a short task never waits behind a
training run. Training workers take one task at a time (prefetch 1, acks late).
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from celery import Celery, signals

from swav_service.settings import Settings, get_settings

INGEST_TASK = "worker.tasks.ingest_dataset"
TRAIN_TASK = "worker.tasks.run_job"
EMBED_TASK = "worker.tasks.embed_dataset"
EVAL_TASK = "worker.tasks.evaluate_checkpoint"
SUPERVISOR: Any = None


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


@signals.celeryd_after_setup.connect
def _consume_every_size_that_fits(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """A training worker also reads the queues of jobs with more ranks per node, up to
    what it can run (worker/resources.py): the broker never hands it a job too large."""
    from worker.resources import detect_resources, train_queues

    settings = get_settings()
    queues = instance.app.amqp.queues
    if settings.train_queue not in (queues.consume_from or {}):
        return
    for name in train_queues(settings, detect_resources(settings).ranks)[1:]:
        queues.select_add(queues[name])  # declared as a sender declares it: exchange = name


@signals.worker_ready.connect
def _start_supervisor(sender: Any = None, **_: Any) -> None:
    """Heartbeats and the reconciler run in a thread of every worker (worker/reconciler.py)."""
    from worker.reconciler import Supervisor
    from worker.resources import detect_resources

    global SUPERVISOR
    settings = get_settings()
    sized = f"{settings.train_queue}.gpus"  # listed as the worker's `ranks`, not one by one
    consumed = app.amqp.queues.consume_from or ()
    queues = ",".join(sorted(q for q in consumed if not q.startswith(sized)))
    training = settings.train_queue in queues.split(",")
    resources = detect_resources(settings).as_dict() if training else {}
    SUPERVISOR = Supervisor(settings, str(getattr(sender, "hostname", "worker")), queues)
    SUPERVISOR.resources = resources
    SUPERVISOR.start()
    if training:  # the heartbeat carries the measured profile once it is known
        threading.Thread(target=_add_machine_profile, args=(SUPERVISOR,), daemon=True).start()


def _add_machine_profile(supervisor: Any) -> None:
    from worker.resources import machine_profile

    profile = machine_profile()
    if profile is not None:
        supervisor.resources = {**supervisor.resources, "machine": profile}


@signals.worker_shutting_down.connect
def _hand_back_on_shutdown(**_: Any) -> None:
    """SIGTERM: the running job checkpoints and goes back to the queue (worker/runner.py)."""
    from worker.runner import SHUTDOWN

    SHUTDOWN.set()


@signals.worker_shutdown.connect
def _stop_supervisor(**_: Any) -> None:
    if SUPERVISOR is not None:
        SUPERVISOR.stopped.set()
        with contextlib.suppress(Exception):
            from worker.reconciler import clear_presence

            clear_presence(SUPERVISOR.worker_name)
