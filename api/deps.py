"""Injected dependencies: a database session per request, the settings, the current tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.auth import LOCAL_TENANT, authenticate
from api.errors import ApiError
from swav_service.db import get_sessionmaker
from swav_service.settings import Settings, get_settings

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key from `swav-service create-key --tenant NAME`, sent as "
    "`Authorization: Bearer <key>`.",
)


def get_session() -> Iterator[Session]:
    """A session for one request; routes commit explicitly, anything else is rolled back."""
    with get_sessionmaker()() as session:
        yield session


def unauthorized() -> ApiError:
    """The one 401 for a missing, malformed, unknown or revoked key (nothing tells which)."""
    return ApiError(
        401,
        "unauthorized",
        "a valid API key is required: send `Authorization: Bearer <key>` (create one with "
        "`swav-service create-key --tenant NAME`)",
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_key(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header; None for any other value."""
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" and key.strip() else None


def tenant_of(settings: Settings, authorization: str | None) -> str:
    """The tenant of the `Authorization: Bearer <key>` header's key, or the 401.

    With `SWAV_AUTH_ENABLED=false` every request is tenant "local". The key is looked up
    in a short session of its own, so no connection is held while a request streams.
    """
    if not settings.auth_enabled:
        return LOCAL_TENANT
    key = bearer_key(authorization)
    if key is None:
        raise unauthorized()
    with get_sessionmaker()() as session:
        tenant = authenticate(session, key)
    if tenant is None:
        raise unauthorized()
    return tenant


def get_tenant(
    request: Request,
    settings: Annotated[Settings, Depends(get_settings)],
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant that owns what the request reads and creates: the API key's tenant, as
    api/request_guard.py found it before the body was read (looked up here otherwise).
    `credentials` declares the scheme in /openapi.json."""
    tenant = getattr(request.state, "tenant", None)
    if isinstance(tenant, str):
        return tenant
    return tenant_of(settings, request.headers.get("authorization"))


# Closed when the route function returns, before its response is sent: a streamed answer
# (events, downloads) holds no database connection while it streams.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
