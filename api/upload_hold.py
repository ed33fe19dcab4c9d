"""An upload's hold on the tenant's stored bytes while its body streams in.

Dataset archives and weights files are both admitted the same way: the cap is the smaller
of the upload's own limit and what the tenant has left (403 past the second), the bytes are
reserved (swav_service/quota.py) before they are written, and the row that finally counts
them takes the reservation over in its own transaction. A concurrent upload of the tenant
therefore sees them as taken from the first byte, not only once the first upload ends.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from sqlalchemy.orm import Session

from api.errors import ApiError
from api.limits import storage_error, storage_left, storage_refused
from swav_service import quota
from swav_service.quota import RESERVATION_RENEW_S, StorageLimitExceeded
from swav_service.settings import Settings

RESERVE_STEP = 64 << 20  # a streamed upload without a length reserves this much at a time


@dataclass(frozen=True)
class UploadCap:
    """The most bytes an upload may bring, and the error for passing it (413 for the
    upload's own limit, 403 when the tenant's stored-bytes limit binds first)."""

    nbytes: int
    too_large: Callable[[], ApiError]


def upload_cap(
    session: Session, settings: Settings, tenant: str, cap: int, too_large: Callable[[], ApiError]
) -> UploadCap:
    """`cap` and its 413, or what the tenant has left and its 403 when that is smaller;
    ApiError 403 when nothing is left. The connection goes back to the pool after."""
    try:
        left = storage_left(session, settings, tenant)
    finally:
        session.rollback()
    if left is not None and left < cap:
        limit = settings.tenant_max_stored_bytes
        return UploadCap(left, partial(storage_error, limit - left, limit, left))
    return UploadCap(cap, too_large)


def declared_bytes(content_length: str, cap: int) -> int:
    """What to reserve at admission: the body's Content-Length (at most `cap`), else 0
    (the hold then grows as bytes arrive)."""
    return min(int(content_length), cap) if content_length.isdigit() else 0


class UploadHold:
    """An upload's reservation of stored bytes (swav_service/quota.py): grown before the
    bytes it covers are written, renewed while the body streams, dropped at the end or
    released by the caller in the transaction that writes the upload's row."""

    def __init__(self, session: Session, settings: Settings, tenant: str, cap: int) -> None:
        self.session, self.settings, self.tenant, self.cap = session, settings, tenant, cap
        self.reservation_id: str | None = None
        self.held = 0
        self.renewed_at: float | None = None

    def grow(self, needed: int, step: int = 0) -> None:
        """Hold at least `needed` bytes (`step` more at a time, at most the cap); 403 if
        they do not fit. The first call checks the limit even for 0 bytes."""
        due = self.renewed_at is None or time.monotonic() - self.renewed_at >= RESERVATION_RENEW_S
        if needed <= self.held and not due:
            return
        target = min(self.cap, max(needed, self.held + step)) if needed > self.held else self.held
        try:
            self.reservation_id = quota.reserve(
                self.session, self.settings, self.tenant, target, self.reservation_id
            )
        except StorageLimitExceeded as error:
            raise storage_refused(error) from error
        self.held, self.renewed_at = target, time.monotonic()

    def drop(self) -> None:
        if self.reservation_id is not None:
            try:
                quota.release(self.session, self.reservation_id)
                self.session.commit()
            finally:
                self.session.rollback()
