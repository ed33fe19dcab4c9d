"""Enqueue work by task name, so the API does not import the worker's task code."""

from __future__ import annotations

from swav_service.settings import get_settings
from worker.celery_app import EMBED_TASK, EVAL_TASK, INGEST_TASK, TRAIN_TASK, app
from worker.resources import train_queue_for


def enqueue_ingest(dataset_id: str) -> None:
    app.send_task(INGEST_TASK, args=[dataset_id])


def enqueue_job(job_id: str, gpus: int = 1, messages: int = 1) -> None:
    """Send `messages` "train job X" messages to the queue of jobs with `gpus` ranks per
    node: one per node of a multi-node job (each worker that reads one claims a node)."""
    queue = train_queue_for(get_settings(), gpus)
    for _ in range(messages):
        app.send_task(TRAIN_TASK, args=[job_id], queue=queue)


def enqueue_embedding(embedding_job_id: str) -> None:
    app.send_task(EMBED_TASK, args=[embedding_job_id])


def enqueue_evaluation(checkpoint_id: str) -> None:
    app.send_task(EVAL_TASK, args=[checkpoint_id])
