"""Idempotent creation: a retry with the same `Idempotency-Key` and body replays the first
answer instead of creating a second object.

The first answer is stored (`IdempotencyRecord`, per tenant and key) in the transaction
that creates the object, so a retry finds either both or neither; the same key with
another body is a 409, never a silent replay of something else.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any

from fastapi import Header
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import delete
from sqlalchemy.orm import Session

from api.errors import ApiError
from swav_service.models import IdempotencyRecord

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retries with the same key and body replay the first answer.",
    ),
]


def request_hash(payload: BaseModel) -> str:
    """sha256 of the request body as canonical JSON (sorted keys, no spaces)."""
    canonical = json.dumps(payload.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def previous_answer(
    session: Session, tenant: str, key: str | None, digest: str
) -> JSONResponse | None:
    """The stored answer to this key, or None when there is no key or nothing stored yet;
    ApiError 409 `idempotency_conflict` when the key was used with another body."""
    if key is None:
        return None
    record = session.get(IdempotencyRecord, (tenant, key))
    if record is None:
        return None
    if record.request_hash != digest:
        raise ApiError(
            409,
            "idempotency_conflict",
            "this Idempotency-Key was used with a different request body; use a new key",
            "Idempotency-Key",
        )
    return JSONResponse(record.response, status_code=record.status_code)


def remember_answer(
    session: Session, tenant: str, key: str, digest: str, status_code: int, body: dict[str, Any]
) -> None:
    """Store the answer in the session's transaction, to be committed with the object."""
    session.add(
        IdempotencyRecord(
            tenant=tenant, key=key, request_hash=digest, status_code=status_code, response=body
        )
    )


def forget_answer(session: Session, tenant: str, key: str) -> None:
    """Drop the stored answer (uncommitted), so a retry with the key creates anew."""
    session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key
        )
    )
