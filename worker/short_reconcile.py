"""The reconciler's passes over short tasks (ingestion, batch embedding, evaluation).

A short worker killed with -9 leaves its row held under a lease nobody renews, and Celery
on Redis has already forgotten the message; a Redis restart drops messages still
waiting. Each pass is a compare-and-set per row, so every worker may run it at once:

- a row whose lease expired loses the claim (its token bumped, so the lost worker can
  never write again); with attempts left it awaits its task again and is sent anew, else
  it gets its kind's `worker_lost` outcome (worker/short_lease.py);
- a row awaiting its task, held by nobody, sent more than `resend_after_s` ago, whose
  message is not waiting in the short queue, is sent again. Unacked messages are not
  counted: a live worker claims its message as it reads it, so an unacked message of an
  unclaimed row is a dead worker's (a duplicate is harmless: claims are compare-and-set).
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import and_, func, not_, or_, select, update

from swav_service.db import session_scope
from swav_service.dispatch import producer
from swav_service.models import utcnow
from swav_service.settings import Settings
from worker.broker_view import broker_messages
from worker.short_lease import SHORT_KINDS, ShortKind

log = logging.getLogger(__name__)


def send_short(kind: ShortKind, row_id: str) -> None:
    producer().send_task(kind.task, args=[row_id])


def _expired(kind: ShortKind, settings: Settings) -> int:
    model = kind.model
    lease = model.task_lease_expires_at
    # Held with no lease and not awaiting a claim: an embedding job left `running` before
    # claims had leases (migration 0008); it is as lost as an expired one.
    lost = or_(lease < utcnow(), and_(lease.is_(None), not_(kind.waiting)))
    with session_scope() as session:
        rows = session.execute(
            select(model.id, model.task_token, model.task_attempts).where(kind.held, lost)
        ).all()
    moved = 0
    for row_id, token, attempts in rows:
        retry = attempts < settings.short_task_max_attempts
        outcome = (
            {**kind.on_requeue, "task_sent_at": utcnow()} if retry else kind.give_up(attempts)
        )
        with session_scope() as session:
            changed = session.execute(
                update(model)
                .where(model.id == row_id, model.task_token == token, kind.held)
                .values(task_token=token + 1, task_lease_expires_at=None, **outcome)
            )
        if changed.rowcount != 1:  # type: ignore[attr-defined]
            continue  # renewed, finished or repaired meanwhile
        moved += 1
        if not retry:
            log.warning("%s %s failed: its claim was lost %d times", kind.name, row_id, attempts)
            continue
        log.info("%s %s: lease expired after attempt %d; sent again", kind.name, row_id, attempts)
        try:
            send_short(kind, row_id)
        except Exception:
            log.warning("could not send %s %s; the resend pass retries", kind.name, row_id)
    return moved


def expired_short_leases(settings: Settings) -> int:
    """Requeue (or, past the attempt cap, fail) every short task whose lease expired."""
    return sum(_expired(kind, settings) for kind in SHORT_KINDS)


def lost_short_messages(settings: Settings) -> int:
    """Send again every unclaimed short task whose message is not in the short queue."""
    cutoff = utcnow() - timedelta(seconds=settings.resend_after_s)
    due: list[tuple[ShortKind, str]] = []
    with session_scope() as session:
        for kind in SHORT_KINDS:
            model = kind.model
            sent_at = func.coalesce(model.task_sent_at, kind.requested_at)
            ids = session.scalars(
                select(model.id).where(
                    kind.waiting, model.task_lease_expires_at.is_(None), sent_at < cutoff
                )
            ).all()
            due += [(kind, row_id) for row_id in ids]
    if not due:
        return 0
    waiting, _ = broker_messages(settings, settings.short_queue)
    resent = 0
    for kind, row_id in due:
        if waiting[(kind.task, row_id)]:
            continue
        send_short(kind, row_id)
        with session_scope() as session:
            session.execute(
                update(kind.model).where(kind.model.id == row_id).values(task_sent_at=utcnow())
            )
        log.info("re-sent %s %s: its message was not in the broker", kind.name, row_id)
        resent += 1
    return resent
