"""The API as a whole: probes, the dashboard's files, the OpenAPI contract, the error
envelope, tenants and list parameters.

The HTTP API over real HTTP: a `swav-service api` uvicorn process on a migrated PostgreSQL
database, with Redis as the broker (tests/api/conftest.py). No worker runs: the broker
messages stay in Redis, and the states a worker would write (a ready dataset, events,
checkpoints) are written straight into the same database (tests/api/helpers.py).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.api.conftest import assert_error
from tests.api.helpers import (
    add_dataset,
)
from tests.conftest import Service

# --------------------------------------------------------------------------- health, errors


def test_health_readiness_and_unknown_routes(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "database": "ok", "broker": "ok"}
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/jobs"), 405, "method_not_allowed")
    assert client.get("/docs").status_code == 200
    assert "/v1/jobs/{job_id}/events" in client.get("/openapi.json").json()["paths"]


def _resolved(spec: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """A schema with its $ref (directly or as the one allOf entry) followed."""
    ref = schema.get("$ref") or next((s["$ref"] for s in schema.get("allOf", [])), None)
    if ref is None:
        return schema
    name = ref.rsplit("/", 1)[-1]
    resolved: dict[str, Any] = spec["components"]["schemas"][name]
    return resolved


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    assert len(options) == 1, schema
    return options[0]


BOUND_KEYS = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum"}


@pytest.mark.parametrize("path", ["/", "/dashboard/index.html", "/dashboard/app.js"])
def test_every_dashboard_file_is_served_unframeable_and_script_locked(
    client: httpx.Client, path: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200
    policy = response.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy and "default-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert response.headers["x-content-type-options"] == "nosniff"


def test_openapi_documents_every_config_field_bound_preset_and_status(
    client: httpx.Client,
) -> None:
    """Generated clients see the whole contract: every TrainConfig field with its
    description and bounds, the presets and the statuses, read from /openapi.json; a job
    answers its config as the full TrainConfig, version included."""
    from swav_core.config import SETTABLE_FIELDS, TrainConfig
    from swav_core.presets import PRESETS
    from swav_service.models import DATASET_STATUSES, JOB_STATUSES

    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    job_create = schemas["JobCreate"]["properties"]
    config = _resolved(spec, job_create["config"])
    assert config.get("additionalProperties") is False
    assert set(config["properties"]) == set(SETTABLE_FIELDS)
    assert set(TrainConfig.model_fields) == {*SETTABLE_FIELDS, "config_version"}
    shown = _resolved(spec, schemas["JobPublic"]["properties"]["config"])
    assert set(shown["properties"]) == set(TrainConfig.model_fields)
    bounds_seen = 0
    for name in SETTABLE_FIELDS:
        info = TrainConfig.model_fields[name]
        documented = config["properties"][name]
        assert documented.get("description") == info.description, name
        value_schema = _non_null(documented)
        for constraint in info.metadata:
            for attr, key in BOUND_KEYS.items():
                if getattr(constraint, attr, None) is not None:
                    assert value_schema[key] == getattr(constraint, attr), (name, key)
                    bounds_seen += 1
    assert bounds_seen >= 10  # the config has bounds, and they are all documented
    assert set(_non_null(job_create["preset"])["enum"]) == {"auto", *PRESETS}
    assert set(schemas["JobPublic"]["properties"]["status"]["enum"]) == set(JOB_STATUSES)
    assert set(schemas["DatasetPublic"]["properties"]["status"]["enum"]) == set(DATASET_STATUSES)


def test_unexpected_and_engine_errors_use_the_envelope() -> None:
    """In process: routes that raise are answered with the envelope and no stack trace."""
    from api.main import create_app
    from swav_core.errors import ConfigError

    app = create_app()

    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret detail in a stack frame")

    @app.get("/engine")
    def engine() -> None:
        raise ConfigError("batch_size=30 is not divisible by world_size=4")

    async def get(path: str) -> httpx.Response:
        # The server error middleware answers, then re-raises for the server's log.
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as local:
            return await local.get(path)

    response = asyncio.run(get("/boom"))
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "code": "internal",
            "message": "internal server error; the server log has details",
            "param": None,
        }
    }
    assert "secret" not in response.text and "Traceback" not in response.text
    message = assert_error(asyncio.run(get("/engine")), 422, "invalid_config")
    assert "world_size=4" in message


@pytest.mark.parametrize(
    ("method", "path", "param"),
    [
        ("GET", "/v1/datasets/ds_missing", "dataset_id"),
        ("DELETE", "/v1/datasets/ds_missing", "dataset_id"),
        ("GET", "/v1/jobs/job_missing", "job_id"),
        ("POST", "/v1/jobs/job_missing/cancel", "job_id"),
        ("POST", "/v1/jobs/job_missing/resume", "job_id"),
        ("GET", "/v1/jobs/job_missing/events", "job_id"),
        ("GET", "/v1/jobs/job_missing/checkpoints", "job_id"),
        ("GET", "/v1/checkpoints/ckpt_missing", "checkpoint_id"),
        ("GET", "/v1/checkpoints/ckpt_missing/download", "checkpoint_id"),
    ],
)
def test_unknown_ids_are_404(client: httpx.Client, method: str, path: str, param: str) -> None:
    message = assert_error(client.request(method, path), 404, "not_found", param)
    assert "missing" in message


def test_other_tenants_rows_are_invisible(api: Service, client: httpx.Client) -> None:
    foreign = add_dataset(api, tenant="someone-else")
    assert_error(client.get(f"/v1/datasets/{foreign}"), 404, "not_found", "dataset_id")
    listed = client.get("/v1/datasets", params={"limit": 200}).json()["data"]
    assert foreign not in {d["id"] for d in listed}
    response = client.post("/v1/jobs", json={"dataset_id": foreign, "preset": "cpu-tiny"})
    assert_error(response, 404, "not_found", "dataset_id")


def test_list_parameters_are_validated(client: httpx.Client) -> None:
    for limit in (0, 201):
        message = assert_error(
            client.get("/v1/jobs", params={"limit": limit}), 422, "invalid_request", "limit"
        )
        assert message.startswith("limit: ")
    for cursor in ("not-base64!", "bm90IGpzb24", "WzEsMiwzXQ"):  # junk, "not json", [1,2,3]
        response = client.get("/v1/datasets", params={"cursor": cursor})
        assert_error(response, 400, "invalid_cursor", "cursor")
    message = assert_error(
        client.get("/v1/jobs", params={"status": "sleeping"}), 422, "invalid_request", "status"
    )
    assert "'sleeping' is not a job status" in message and "cancelled" in message


def test_readiness_in_embedded_mode(embedded_service: Service) -> None:
    """SQLite and Celery's filesystem transport: ready while the broker folder is writable."""
    embedded_service.start_api()
    with embedded_service.client() as client:
        assert client.get("/readyz").json() == {
            "status": "ready",
            "database": "ok",
            "broker": "ok",
        }
        queue = embedded_service.data_dir / "broker" / "queue"
        queue.rename(queue.with_name("moved"))
        message = assert_error(client.get("/readyz"), 503, "not_ready")
        assert message.startswith("not ready: the broker is unreachable")
        assert "database" not in message and str(queue) not in message  # no server path
