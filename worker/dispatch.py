"""Enqueue work by task name, so the API does not import the worker's task code."""

from __future__ import annotations

from worker.celery_app import EMBED_TASK, EVAL_TASK, INGEST_TASK, TRAIN_TASK, app


def enqueue_ingest(dataset_id: str) -> None:
    app.send_task(INGEST_TASK, args=[dataset_id])


def enqueue_job(job_id: str) -> None:
    app.send_task(TRAIN_TASK, args=[job_id])


def enqueue_embedding(embedding_job_id: str) -> None:
    app.send_task(EMBED_TASK, args=[embedding_job_id])


def enqueue_evaluation(checkpoint_id: str) -> None:
    app.send_task(EVAL_TASK, args=[checkpoint_id])
