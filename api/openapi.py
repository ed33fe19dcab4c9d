"""The OpenAPI document, with every error answer described as what it is: the envelope.

FastAPI documents 422 as its own `HTTPValidationError` and leaves other error statuses
without a body schema, while every error here is `{"error": {"code", "message",
"param"}}` (api/errors.py). This rewrites each 4xx/5xx response of the generated document
to that schema, and documents the errors every operation of a kind can answer: 401 where
an API key is needed, 404 where the path names an object, 400 for a bad `cursor` or an
unparsable body, 422 where there is input. So clients and schema-driven tests
(schemathesis) can check status codes and error bodies too.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from api.schemas.common import ErrorResponse

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
UNAUTHORIZED = "No API key, or an unknown or revoked one (`unauthorized`)."
NOT_FOUND = "No such object for this API key's tenant (`not_found`)."
BAD_CURSOR = "`cursor` is not a `next_cursor` of this list (`invalid_cursor`)."
BAD_BODY = "The body cannot be parsed (`bad_request`, `invalid_multipart`)."
INVALID = "A request field is missing or invalid (`invalid_request`; `param` names it)."
_FASTAPI_VALIDATION = ("HTTPValidationError", "ValidationError")
BINARY = {"type": "string", "format": "binary"}  # a file part


def form_body(
    properties: dict[str, Any], required: list[str], json_schema: dict[str, Any] | None = None
) -> dict[str, Any]:
    """`openapi_extra` documenting a required multipart/form-data body (and, with
    `json_schema`, the JSON body the route also takes): routes that parse their body
    themselves, to stream it under a cap, get no body in FastAPI's generated document."""
    content: dict[str, Any] = {}
    if json_schema is not None:
        content["application/json"] = {"schema": json_schema}
    content["multipart/form-data"] = {
        "schema": {"type": "object", "required": required, "properties": properties}
    }
    return {"requestBody": {"required": True, "content": content}}


def implied_errors(operation: dict[str, Any]) -> dict[str, str]:
    """The error statuses an operation answers by its shape alone, and why."""
    parameters = operation.get("parameters", [])
    errors: dict[str, str] = {}
    if operation.get("security"):
        errors["401"] = UNAUTHORIZED
    if any(p.get("in") == "path" for p in parameters):
        errors["404"] = NOT_FOUND
    if any(p.get("in") == "query" and p.get("name") == "cursor" for p in parameters):
        errors["400"] = BAD_CURSOR
    if "requestBody" in operation:
        errors["400"] = BAD_BODY
    if parameters or "requestBody" in operation:
        errors["422"] = INVALID
    return errors


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document (cached on the app), errors described as the envelope."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(
        title=app.title,
        version=app.version,
        description=app.description,
        routes=app.routes,
    )
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    envelope = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(envelope.pop("$defs", {}))
    components["ErrorResponse"] = envelope
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            for status, description in implied_errors(operation).items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status[:1] in ("4", "5"):
                    response["content"] = {"application/json": {"schema": ERROR_REF}}
    for name in _FASTAPI_VALIDATION:
        components.pop(name, None)
    app.openapi_schema = schema
    return schema
