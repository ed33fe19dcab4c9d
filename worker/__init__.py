"""Celery workers that run swav_core jobs: dataset ingestion and training."""
