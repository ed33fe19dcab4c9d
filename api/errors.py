"""One error envelope for every 4xx and 5xx answer: {"error": {"code", "message", "param"}}.

`code` is stable and machine-readable, `message` says what went wrong and how to fix it,
`param` names the request field at fault (dotted path) or is null. Handlers never echo
request values (an upload or a config can be large) and never include a stack trace.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DataError as DatabaseDataError
from starlette.exceptions import HTTPException as StarletteHTTPException

from swav_core.errors import CheckpointError, ConfigError, DataError, SwavError

log = logging.getLogger(__name__)

# HTTP status of each engine error that reaches the API; anything else is a 500.
SWAV_ERROR_STATUS: dict[type[SwavError], int] = {
    ConfigError: 422,
    DataError: 422,
    CheckpointError: 500,
}

# Codes for errors raised by Starlette/FastAPI themselves (unknown route, bad method, ...).
HTTP_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}

_LOCATIONS = ("body", "query", "path", "header", "cookie")


class ApiError(Exception):
    """An error answered with the envelope: raise it anywhere below a route."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers

    def response(self) -> JSONResponse:
        """The envelope `{"error": {"code", "message", "param"}}` with the status and headers."""
        body = {"error": {"code": self.code, "message": self.message, "param": self.param}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


def not_found(kind: str, param: str, identifier: str) -> ApiError:
    return ApiError(404, "not_found", f"no {kind} with id {identifier!r}", param)


def field_path(loc: Sequence[Any]) -> str | None:
    """`("body", "config", "epochs")` -> "config.epochs"; the location kind is dropped."""
    parts = [str(p) for p in loc]
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(parts) or None


def describe_error(error: dict[str, Any], param: str | None) -> str:
    """One pydantic error as "field: what to fix", without the offending input value."""
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
    if kind == "json_invalid":
        return "the request body is not valid JSON"
    if kind == "missing":
        return f"{param}: this field is required" if param else "the request body is required"
    if kind == "extra_forbidden":
        return f"{param}: unknown field; remove it (see the schema at /docs)"
    return f"{param}: {message}" if param else message


def validation_error(
    errors: Sequence[Any], prefix: str = "", code: str = "invalid_request"
) -> ApiError:
    """An ApiError(422) from pydantic errors: `param` is the first field, all are listed."""
    # A JSON syntax error's loc holds a character offset, not a field.
    params = [
        None if e.get("type") == "json_invalid" else field_path(e.get("loc", ())) for e in errors
    ]
    if prefix:
        params = [f"{prefix}.{p}" if p else prefix for p in params]
    messages = [describe_error(e, p) for e, p in zip(errors, params, strict=True)]
    unique = list(dict.fromkeys(messages))
    message = "; ".join(unique[:5]) + (f" (and {len(unique) - 5} more)" if len(unique) > 5 else "")
    return ApiError(422, code, message or "invalid request", params[0] if params else None)


async def _api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    return exc.response()


def _is_config_error(error: dict[str, Any]) -> bool:
    """A bad preset or a bad value of one config field (not a config that is not an object)."""
    loc = tuple(error.get("loc", ()))
    return loc[:2] == ("body", "preset") or (loc[:2] == ("body", "config") and len(loc) > 2)


async def _request_validation(request: Request, exc: Exception) -> JSONResponse:
    """422 `invalid_request`; `invalid_config` when the first error is in the job's preset
    or config fields, the code the resolved config's own checks answer too."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    code = "invalid_config" if errors and _is_config_error(errors[0]) else "invalid_request"
    return validation_error(errors, code=code).response()


def allowed_methods(request: Request) -> str:
    """The `Allow` value of a 405: every method the OpenAPI document gives this path (plus
    HEAD with GET). Starlette's names only the first route's, e.g. POST alone on a path
    that serves GET and POST."""
    methods: set[str] = set()
    for template, item in request.app.openapi().get("paths", {}).items():
        pattern = re.sub(r"\\\{[^/]*?\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, request.url.path):
            methods |= {m.upper() for m in item}
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_STATUS_CODES.get(exc.status_code, "internal" if exc.status_code >= 500 else "error")
    headers = dict(exc.headers or {})
    if exc.status_code == 404:
        message = f"no route {request.url.path}; see /docs for the API"
    elif exc.status_code == 405:
        message = f"{request.method} is not allowed on {request.url.path}"
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    else:
        message = str(exc.detail)
    return ApiError(exc.status_code, code, message, headers=headers or None).response()


async def _swav_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, SwavError)
    status = next((s for t, s in SWAV_ERROR_STATUS.items() if isinstance(exc, t)), 500)
    if status >= 500:
        log.error("engine error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(status, exc.code, str(exc)).response()


async def _database_data_error(request: Request, exc: Exception) -> JSONResponse:
    """A value the database refuses (a NUL character in a string, an integer out of range):
    it came from the request, so 422 rather than 500. PostgreSQL raises it; SQLite
    stores such values."""
    log.warning("database refused a value on %s %s: %s", request.method, request.url.path,
                str(exc).splitlines()[0][:300])
    return ApiError(
        422,
        "invalid_value",
        "a value in the request cannot be stored or looked up (a NUL character in a "
        "string, or a number out of range); remove it",
    ).response()


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return ApiError(
        500, "internal", "internal server error; the server log has details"
    ).response()


def register_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(SwavError, _swav_error)
    app.add_exception_handler(DatabaseDataError, _database_data_error)
    app.add_exception_handler(Exception, _unhandled)
