"""Injected dependencies: a database session per request, the settings, the current tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from api.db import get_sessionmaker
from api.settings import Settings, get_settings


def get_session() -> Iterator[Session]:
    """A session for one request; routes commit explicitly, anything else is rolled back."""
    with get_sessionmaker()() as session:
        yield session


def get_tenant() -> str:
    """The tenant that owns what the request reads and creates.

    Every request is tenant "local" until authentication exists; swap this one function
    (e.g. for one that reads an API key) and every route is scoped by it.
    """
    return "local"


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
TenantDep = Annotated[str, Depends(get_tenant)]
