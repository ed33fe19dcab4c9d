"""Claims on short tasks: ingestion, batch embedding and evaluation, one mechanism for all.

Celery on Redis acks nothing back when a worker is killed with -9, so a short task's row
says itself whether a worker holds it (swav_service.models.ShortTaskClaim). A worker
claims the row with one compare-and-set UPDATE (the row awaits its task and nobody holds
it: the token is bumped, an attempt counted, a lease set), so a message delivered twice
runs once. A heartbeat thread renews the lease every third of `short_task_lease_s`; every
final write goes through `ShortClaim.finish` or `ShortClaim.holds`, which check the token,
so a worker presumed lost cannot overwrite its successor. worker/short_reconcile.py
sends a task again when its lease expires, and fails its row after
`short_task_max_attempts` lost claims.

A `ShortKind` says, for one kind of row, what "awaits its task" and "held" mean, what a
claim and a requeue change, and what giving up writes where the user sees it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from swav_service.db import session_scope
from swav_service.dispatch import EMBED_TASK, EVAL_TASK, INGEST_TASK
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, utcnow
from swav_service.settings import Settings

log = logging.getLogger(__name__)
WORKER_LOST = "worker_lost"


def lost_message(doing: str, attempts: int, redo: str) -> str:
    times = "once" if attempts == 1 else f"{attempts} times"
    return (
        f"the worker {doing} was lost (killed, or it stopped renewing its claim) {times}, "
        f"the limit (SWAV_SHORT_TASK_MAX_ATTEMPTS); {redo}"
    )


@dataclass(frozen=True)
class ShortKind:
    """One kind of short task: its table, its Celery task, and its row's states.

    `waiting`: the row awaits its task (a claim may take it); `held`: the row is in the
    state its task runs in; `on_claim` / `on_requeue`: what a claim and a requeue after a
    lost lease set besides the claim columns; `give_up(attempts)`: what the row gets when
    its last allowed claim was lost.
    """

    name: str
    model: Any
    task: str
    waiting: ColumnElement[bool]
    held: ColumnElement[bool]
    requested_at: Any  # the column that says since when a never-sent row waits
    give_up: Callable[[int], dict[str, Any]]
    on_claim: dict[str, Any] = field(default_factory=dict)
    on_requeue: dict[str, Any] = field(default_factory=dict)


INGESTION = ShortKind(
    name="ingestion",
    model=Dataset,
    task=INGEST_TASK,
    waiting=Dataset.status == "validating",
    held=Dataset.status == "validating",
    requested_at=Dataset.created_at,
    give_up=lambda attempts: {
        "status": "failed",
        "error_code": WORKER_LOST,
        "error_message": lost_message(
            "validating this dataset", attempts, "upload the archive again"
        ),
    },
)
EMBEDDING = ShortKind(
    name="embedding",
    model=EmbeddingJob,
    task=EMBED_TASK,
    waiting=EmbeddingJob.status == "queued",
    held=EmbeddingJob.status == "running",
    requested_at=EmbeddingJob.created_at,
    give_up=lambda attempts: {
        "status": "failed",
        "finished_at": utcnow(),
        "updated_at": utcnow(),
        "error_code": WORKER_LOST,
        "error_message": lost_message(
            "computing these embeddings", attempts, "request the embeddings again"
        ),
    },
    on_claim={"status": "running"},
    on_requeue={"status": "queued"},
)
EVALUATION = ShortKind(
    name="evaluation",
    model=Checkpoint,
    task=EVAL_TASK,
    waiting=Checkpoint.evaluation_requested_at.is_not(None),
    held=Checkpoint.evaluation_requested_at.is_not(None),
    requested_at=Checkpoint.evaluation_requested_at,
    give_up=lambda attempts: {
        "evaluation_requested_at": None,
        "evaluation_error": {
            "code": WORKER_LOST,
            "message": lost_message(
                "computing this quality report", attempts,
                "POST /v1/checkpoints/{id}/evaluate asks for it again",
            ),
        },
    },
)
SHORT_KINDS = (INGESTION, EMBEDDING, EVALUATION)


class ShortClaimLost(Exception):
    """The row's claim token is no longer this worker's: the reconciler gave the task to
    another worker (or gave up on it)."""


@dataclass
class ShortClaim:
    """This worker's claim on one row: its token, and the lease its heartbeat renews."""

    kind: ShortKind
    row_id: str
    token: int
    ttl_s: float
    lost: threading.Event = field(default_factory=threading.Event)

    def _mine(self) -> tuple[ColumnElement[bool], ...]:
        model = self.kind.model
        return (model.id == self.row_id, model.task_token == self.token, self.kind.held)

    def renew(self) -> bool:
        """Extend the lease; False (and `lost` set) when the claim is no longer ours."""
        model = self.kind.model
        with session_scope() as session:
            renewed = session.execute(
                update(model)
                .where(*self._mine())
                .values(task_lease_expires_at=utcnow() + timedelta(seconds=self.ttl_s))
                .returning(model.id)
            ).first()
        if renewed is None:
            self.lost.set()
        return renewed is not None

    def holds(self, session: Session) -> bool:
        """Lock the row if the claim is still ours (for writes besides `finish`)."""
        model = self.kind.model
        locked = session.execute(select(model.id).where(*self._mine()).with_for_update())
        return locked.first() is not None

    def finish(self, session: Session, **values: Any) -> bool:
        """Write the task's outcome and release the lease, if the claim is still ours."""
        model = self.kind.model
        result = session.execute(
            update(model).where(*self._mine()).values(task_lease_expires_at=None, **values)
        )
        return bool(result.rowcount == 1)  # type: ignore[attr-defined]

    def keep_alive(self, stopped: threading.Event) -> None:
        """Renew every third of the lease until `stopped`, or until the claim is lost; a
        database error is retried at the next beat (the lease may then expire)."""
        while not stopped.wait(self.ttl_s / 3):
            try:
                if not self.renew():
                    log.warning("%s %s: claim lost", self.kind.name, self.row_id)
                    return
            except Exception:
                log.warning("%s %s: lease not renewed", self.kind.name, self.row_id,
                            exc_info=True)


def claim_short(kind: ShortKind, row_id: str, settings: Settings) -> ShortClaim | None:
    """Take the row's task: one compare-and-set UPDATE on a row that awaits its task and
    that nobody holds. None when the row moved on, is gone, or another worker holds it."""
    model = kind.model
    ttl = settings.short_task_lease_s
    with session_scope() as session:
        token = session.execute(
            update(model)
            .where(model.id == row_id, kind.waiting, model.task_lease_expires_at.is_(None))
            .values(
                task_token=model.task_token + 1,
                task_attempts=model.task_attempts + 1,
                task_lease_expires_at=utcnow() + timedelta(seconds=ttl),
                **kind.on_claim,
            )
            .returning(model.task_token)
        ).scalar_one_or_none()
    return None if token is None else ShortClaim(kind, row_id, token, ttl)


@contextmanager
def short_claim(kind: ShortKind, row_id: str, settings: Settings) -> Iterator[ShortClaim | None]:
    """The row's claim (None: nothing to do), its lease renewed while the block runs.

    The lease is not released when the block raises: it expires, and the reconciler
    sends the task again (a database outage mid-task is retried, up to the cap).
    """
    claim = claim_short(kind, row_id, settings)
    if claim is None:
        yield None
        return
    stopped = threading.Event()
    beat = threading.Thread(
        target=claim.keep_alive, args=(stopped,), name=f"swav-{kind.name}-lease", daemon=True
    )
    beat.start()
    try:
        yield claim
    finally:
        stopped.set()
        beat.join()
