"""Cursor pagination shared by every list: newest first by (created_at desc, id desc).

The cursor is opaque to clients: URL-safe base64 of the last item's `[created_at iso, id]`.
Keyset pagination stays correct while rows are added (no skipped or repeated items, unlike
offsets) and costs one index range scan per page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, TypeVar

from fastapi import Query
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from api.errors import ApiError

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

LimitQuery = Annotated[
    int, Query(ge=1, le=MAX_LIMIT, description=f"Items per page, 1..{MAX_LIMIT}.")
]
CursorQuery = Annotated[
    str | None,
    Query(max_length=200, description="`next_cursor` of the previous page; omit for the first."),
]

Row = TypeVar("Row")


def encode_cursor(created_at: datetime, item_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), item_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """(created_at, id) of a cursor; ApiError 400 `invalid_cursor` if it is not one of ours."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, item_id = json.loads(raw)
        if not isinstance(item_id, str):
            raise ValueError("id is not a string")
        return datetime.fromisoformat(created_at), item_id
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise ApiError(
            400,
            "invalid_cursor",
            "cursor is not valid: pass the next_cursor of a previous page unchanged",
            "cursor",
        ) from exc


def paginate(
    session: Session, statement: Select[tuple[Row]], model: Any, limit: int, cursor: str | None
) -> tuple[Sequence[Row], str | None]:
    """One page of `statement` (which selects `model` rows) and the cursor of the next one.

    `model` must have `created_at` and `id` columns. Fetches limit + 1 rows to know
    whether another page exists without a COUNT.
    """
    if cursor is not None:
        created_at, item_id = decode_cursor(cursor)
        statement = statement.where(
            or_(
                model.created_at < created_at,
                and_(model.created_at == created_at, model.id < item_id),
            )
        )
    statement = statement.order_by(model.created_at.desc(), model.id.desc()).limit(limit + 1)
    rows = session.scalars(statement).all()
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)  # type: ignore[attr-defined]
