"""The FastAPI application: `create_app()` (uvicorn runs it with `--factory`)."""

from __future__ import annotations

from fastapi import FastAPI

from api.errors import register_error_handlers
from api.routes import checkpoints, datasets, embedding_jobs, embeddings, health, jobs

DESCRIPTION = """SwAV self-supervised pretraining as a service.

Upload an image archive (`POST /v1/datasets`), submit a job on it (`POST /v1/jobs`),
follow its events (`GET /v1/jobs/{id}/events`, JSON or server-sent events) and download
its checkpoints. Every error answers `{"error": {"code", "message", "param"}}`.
"""


def create_app() -> FastAPI:
    app = FastAPI(
        title="swav-service",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url="/docs",
        openapi_url="/openapi.json",
    )
    app.include_router(health.router)
    app.include_router(datasets.router)
    app.include_router(jobs.router)
    app.include_router(checkpoints.router)
    app.include_router(embeddings.router)
    app.include_router(embedding_jobs.router)
    register_error_handlers(app)
    return app
