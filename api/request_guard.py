"""Every `/v1` request is authenticated before its body is read, and a JSON body is read
under a byte cap with its numbers finite, before any route sees it.

FastAPI reads and parses a route's JSON body before it runs the route's dependencies, so
without this an anonymous client could make the API hold and parse a body of any size
before it answered 401. Here, in front of the routes (an ASGI middleware):

- the key is checked first (`api/deps.py:tenant_of`); a request without a valid one gets
  the 401 with its body unread;
- a body is refused with 413 at its Content-Length when that is over
  `max_json_body_bytes`, else counted as it arrives and refused once it passes it; the
  routes that take images or archives read their own bodies under their own caps
  (`OWN_BODY_CAPS`);
- `Infinity`, `-Infinity` and `NaN`, which Python's JSON parser accepts but JSON does not
  have, are a 422 wherever they stand in the body (a config, metadata), so none reaches
  a float field, a database JSON column or a log.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import tenant_of
from api.errors import ApiError
from swav_service.settings import get_settings

BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})

OWN_BODY_CAPS = (
    ("POST", re.compile(r"/v1/datasets/?")),  # the archive: max_upload_bytes, streamed
    ("POST", re.compile(r"/v1/weights/?")),  # the file: max_weights_bytes, streamed
    ("POST", re.compile(r"/v1/embeddings/?")),  # images: api/body_limits.py
    ("POST", re.compile(r"/v1/jobs/[^/]+/neighbours/?")),  # one image: api/body_limits.py
)
"""Routes that read their own body under their own caps, as it streams."""


def body_too_large(cap: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the request body is over {cap} bytes, the limit for this route (setting "
        "SWAV_MAX_JSON_BODY_BYTES); send a smaller body",
    )


def _refuse_constant(name: str) -> Any:
    raise ApiError(
        422,
        "invalid_request",
        f"the body holds {name}, which is not a JSON number: every number must be finite; "
        "send a finite number, or null where a field allows it",
    )


def check_finite_json(body: bytes, headers: Headers) -> None:
    """422 if the body is JSON holding a non-finite number; any other problem is left to
    the route's own parsing (and its usual 422)."""
    content_type = headers.get("content-type", "application/json").split(";")[0].strip()
    if not body or not (content_type == "application/json" or content_type.endswith("+json")):
        return
    try:
        json.loads(body, parse_constant=_refuse_constant)
    except ValueError:
        return


async def read_body(receive: Receive, headers: Headers, cap: int) -> bytes:
    """The whole body, or ApiError 413 as soon as it is announced or seen over `cap`."""
    length = headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise body_too_large(cap)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ApiError(400, "client_disconnected", "the client went away mid-request")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise body_too_large(cap)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app the body already read, then passes on the server's
    own messages (a client's disconnect is seen when it happens, never invented)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class RequestGuard:
    """The ASGI middleware described above; the tenant it found is `request.state.tenant`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        settings = get_settings()
        headers = Headers(scope=scope)
        try:
            tenant = await run_in_threadpool(tenant_of, settings, headers.get("authorization"))
            scope.setdefault("state", {})["tenant"] = tenant
            method = scope["method"]
            own_cap = any(m == method and p.fullmatch(scope["path"]) for m, p in OWN_BODY_CAPS)
            if method in BODY_METHODS and not own_cap:
                body = await read_body(receive, headers, settings.max_json_body_bytes)
                check_finite_json(body, headers)
                receive = replay(body, receive)
        except ApiError as error:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
