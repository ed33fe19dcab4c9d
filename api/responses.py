"""OpenAPI entries for error answers that several routes give, worded once.

A route spreads them into its `responses` beside its own entries, as FastAPI's docs
combine predefined responses (`responses={**STORAGE_LIMIT, 409: {...}}`); the bodies are
the error envelope (api/openapi.py fills in the schema).
"""

from __future__ import annotations

from typing import Any

Responses = dict[int | str, dict[str, Any]]

STORAGE_LIMIT: Responses = {
    403: {"description": "Over the tenant's stored-bytes limit (`storage_limit_exceeded`)."}
}
ACTIVE_JOBS_LIMIT: Responses = {
    429: {"description": "The tenant has its limit of active jobs (`too_many_active_jobs`)."}
}
RATE_LIMITED: Responses = {
    429: {"description": "Over the tenant's request rate (`rate_limited`); see Retry-After."}
}
CHECKPOINT_GONE: Responses = {
    410: {"description": "The checkpoint was pruned (`checkpoint_gone`)."}
}
BROKER_UNAVAILABLE: Responses = {
    503: {"description": "The task broker is unreachable (`broker_unavailable`)."}
}
TOO_MANY_TASKS: Responses = {
    429: {"description": "The tenant's quality reports and embedding jobs in flight are at "
          "their limit (`too_many_tasks`); see Retry-After."}
}
