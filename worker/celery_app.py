"""The workers' Celery app, and what a worker does when it starts and stops.

The app is made as every sender's is (swav_service.dispatch: task names, queues, routing
and serialisation), with the task modules included. The signal handlers make a training
worker read the queues of every job size it fits, run the heartbeat and reconciler
thread, and hand a running job back on SIGTERM.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

from celery import Celery, signals

from swav_service.dispatch import create_app, train_queues
from swav_service.settings import Settings, get_settings
from worker.child import SHUTDOWN
from worker.reconciler import Supervisor, clear_presence
from worker.resources import detect_resources, machine_profile

SUPERVISOR: Any = None


def create_celery(settings: Settings | None = None) -> Celery:
    """The worker's app: the service's Celery configuration and the task modules."""
    return create_app(settings or get_settings(), include=["worker.tasks"])


app = create_celery()


@signals.celeryd_after_setup.connect
def _consume_every_size_that_fits(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """A training worker also reads the queues of jobs with more ranks per node, up to
    what it can run (swav_service/dispatch.py): the broker never hands it a job too large."""
    settings = get_settings()
    queues = instance.app.amqp.queues
    if settings.train_queue not in (queues.consume_from or {}):
        return
    for name in train_queues(settings, detect_resources(settings).ranks)[1:]:
        queues.select_add(queues[name])  # declared as a sender declares it: exchange = name


@signals.worker_ready.connect
def _start_supervisor(sender: Any = None, **_: Any) -> None:
    """Heartbeats and the reconciler run in a thread of every worker (worker/reconciler.py)."""
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
    profile = machine_profile()
    if profile is not None:
        supervisor.resources = {**supervisor.resources, "machine": profile}


@signals.worker_shutting_down.connect
def _hand_back_on_shutdown(**_: Any) -> None:
    """SIGTERM: the running job checkpoints and goes back to the queue (worker/runner.py)."""
    SHUTDOWN.set()


@signals.worker_shutdown.connect
def _stop_supervisor(**_: Any) -> None:
    if SUPERVISOR is not None:
        SUPERVISOR.stopped.set()
        with contextlib.suppress(Exception):
            clear_presence(SUPERVISOR.worker_name)
