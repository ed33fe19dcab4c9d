"""The FastAPI application: `create_app()` (uvicorn runs it with `--factory`)."""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from api.dashboard import explorer, install_dashboard
from api.deps import get_tenant
from api.errors import register_error_handlers
from api.limits import StreamSlots
from api.metrics import install_metrics
from api.openapi import build_openapi
from api.request_guard import RequestGuard
from api.routes import (
    backbones,
    checkpoints,
    datasets,
    embedding_jobs,
    embeddings,
    events,
    health,
    jobs,
    usage,
    weights,
)
from swav_service.dispatch import prepare_broker
from swav_service.settings import get_settings

DESCRIPTION = """SwAV self-supervised pretraining as a service.

Upload an image archive (`POST /v1/datasets`), submit a job on it (`POST /v1/jobs`),
follow its events (`GET /v1/jobs/{id}/events`, JSON or server-sent events) and download
its checkpoints. Every error answers `{"error": {"code", "message", "param"}}`.

Every `/v1` route needs an API key (`Authorization: Bearer <key>`, from `swav-service
create-key --tenant NAME`) unless the server runs with `SWAV_AUTH_ENABLED=false`, and sees
only its tenant's datasets, jobs, checkpoints and embeddings: another tenant's id is 404.
"""


log = logging.getLogger(__name__)

# What requests need from the engine: a plan counts FLOPs (swav_core.costs, the recipe),
# embeddings and exports run the model. Importing them takes torch's import, seconds.
ENGINE_MODULES = ("swav_core.costs", "swav_core.recipe", "swav_core.exports")


def import_engine() -> None:
    for name in ENGINE_MODULES:
        try:
            importlib.import_module(name)
        except Exception:  # the request that needs it reports the failure
            log.exception("warming up %s failed", name)


@asynccontextmanager
async def engine_warmed_in_background(_: FastAPI) -> AsyncIterator[None]:
    """Import the engine beside the serving loop once the API is up.

    Importing the API stays torch-free, so it starts and answers probes at once; without
    this, the first job submitted after a start waited for torch's import (11 s measured
    here) while holding its database session.
    """
    threading.Thread(target=import_engine, name="engine-warm-up", daemon=True).start()
    yield


def create_app() -> FastAPI:
    # The broker app that sends tasks is built on the first send; the embedded broker's
    # folders are made now, so that /readyz finds them before any upload.
    prepare_broker(get_settings())
    app = FastAPI(
        title="swav-service",
        version="0.1.0",
        description=DESCRIPTION,
        docs_url="/docs",
        openapi_url="/openapi.json",
        lifespan=engine_warmed_in_background,
    )
    app.include_router(health.router)  # public: probes carry no key
    install_metrics(app)  # GET /metrics, public like the probes; request latency
    install_dashboard(app)  # GET / and its static files: public, they hold no data
    # Authenticated at the router too, so a new /v1 route cannot forget it.
    authenticated = [Depends(get_tenant)]
    for module in (
        datasets, jobs, events, checkpoints, embeddings, embedding_jobs, usage, weights,
        explorer, backbones
    ):
        app.include_router(module.router, dependencies=authenticated)
    register_error_handlers(app)
    app.state.stream_slots = StreamSlots()  # open event streams per tenant (api/limits.py)
    app.add_middleware(RequestGuard)  # the key, then the body's size and numbers
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    return app
