"""`ApiSession`: one connection to a swav-service deployment, with the retry rules.

Errors come back as `ApiError` with the server's `code`, `message` and `param`; when no
answer arrives, `ServerUnreachable`. Retries (with exponential backoff and jitter, at most
`max_retries`) follow what is safe to repeat:

- a connection that could not be opened, and a 429 or 503 that carries Retry-After (the
  server did not act and says when to come back), for any call;
- a lost answer (timeout, dropped connection) and any 429/502/503/504, only for calls
  that are idempotent: reads, embedding requests, and job creation, which sends an
  `Idempotency-Key` (the same one on every attempt) so a repeated create returns the
  first job instead of making a second.

Cancel, resume and dataset uploads are otherwise never repeated. The API's resources are
the methods of `SwavClient` (`swav_client/client.py`), built on this.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any, Self, TypeVar

import httpx
from pydantic import BaseModel

from swav_client.errors import ApiError, ServerUnreachable

DEFAULT_URL = "http://127.0.0.1:8000"
USER_AGENT = "swav-client/0.1.0"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
RETRY_STATUSES = frozenset({429, 502, 503, 504})
BACKOFF_BASE_S = 0.5
BACKOFF_CAP_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is answered with the error instead

R = TypeVar("R", bound=BaseModel)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date; None if absent/bad."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, moment.timestamp() - time.time())


def backoff_s(attempt: int) -> float:
    """Full-jitter exponential backoff for the `attempt`-th retry (0-based)."""
    return random.uniform(0, min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**attempt))


def error_from(response: httpx.Response) -> ApiError:
    """The ApiError of an error answer (its body must have been read)."""
    retry_after = parse_retry_after(response.headers.get("Retry-After"))
    try:
        error = response.json()["error"]
        return ApiError(
            response.status_code,
            str(error["code"]),
            str(error.get("message") or ""),
            error.get("param"),
            retry_after,
        )
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().replace("\n", " ")[:200]
        message = text or response.reason_phrase or "no message"
        return ApiError(
            response.status_code, f"http_{response.status_code}", message, None, retry_after
        )


class ApiSession:
    """An httpx client for one deployment that sends with the module's retry rules.

    Use as a context manager, or `close()`. `api_key` is sent as
    `Authorization: Bearer <key>`. `transport` is passed to httpx
    (e.g. `httpx.HTTPTransport(uds=...)`).
    """

    def __init__(
        self,
        base_url: str = DEFAULT_URL,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"User-Agent": USER_AGENT}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.max_retries = max_retries
        self._http = httpx.Client(
            base_url=base_url.rstrip("/"), headers=headers, timeout=timeout, transport=transport
        )

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(
        self,
        method: str,
        path: str,
        *,
        idempotent: bool,
        stream: bool = False,
        body: Callable[[], dict[str, Any]] | None = None,
        timeout: httpx.Timeout | None = None,
        **request: Any,
    ) -> httpx.Response:
        """Send with the retry rules of the module docstring; error answers raise ApiError.

        `body()` gives extra `build_request` arguments anew for each attempt (a streamed
        upload must start again from its first byte). With `stream`, the caller reads
        and closes the successful response.
        """
        if timeout is not None:
            request["timeout"] = timeout
        for attempt in range(self.max_retries + 1):
            last = attempt == self.max_retries
            extra = body() if body is not None else {}
            built = self._http.build_request(method, path, **request, **extra)
            try:
                response = self._http.send(built, stream=stream)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                if last:
                    raise ServerUnreachable(f"cannot connect to {self.base_url}: {exc}") from exc
                time.sleep(backoff_s(attempt))
                continue
            except httpx.TransportError as exc:
                if last or not idempotent:
                    raise ServerUnreachable(
                        f"{method} {path}: no answer from {self.base_url} ({exc!r})"
                    ) from exc
                time.sleep(backoff_s(attempt))
                continue
            if response.is_success:
                return response
            response.read()
            response.close()
            error = error_from(response)
            wait = self._retry_wait(error, attempt, idempotent)
            if last or wait is None:
                raise error
            time.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    @staticmethod
    def _retry_wait(error: ApiError, attempt: int, idempotent: bool) -> float | None:
        """Seconds to wait before retrying `error`, or None when it must not be retried."""
        if error.status not in RETRY_STATUSES:
            return None
        if error.retry_after is not None:
            if error.retry_after > MAX_RETRY_AFTER_S:
                return None
            if error.status in (429, 503) or idempotent:
                return error.retry_after
            return None
        return backoff_s(attempt) if idempotent else None

    def _get(self, path: str, model: type[R], **params: Any) -> R:
        query = {k: v for k, v in params.items() if v is not None}
        response = self._send("GET", path, idempotent=True, params=query)
        return model.model_validate_json(response.content)

    def _post(self, path: str, model: type[R], idempotent: bool = False, **request: Any) -> R:
        response = self._send("POST", path, idempotent=idempotent, **request)
        return model.model_validate_json(response.content)
