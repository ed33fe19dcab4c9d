"""Claims on short tasks (worker/short_lease.py) and the reconciler's care of them
(worker/short_reconcile.py): one mechanism for ingestion, batch embedding and evaluation.

A real migrated SQLite database and Celery's real filesystem transport (the broker that
embedded mode uses), so every message the reconciler sends can be read back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from swav_service import dispatch
from swav_service.db import session_scope
from swav_service.job_state import evaluation_request
from swav_service.models import Checkpoint, Dataset, EmbeddingJob, Job, as_utc, new_id, utcnow
from swav_service.settings import Settings
from worker.broker_view import broker_messages
from worker.short_lease import (
    EMBEDDING,
    EVALUATION,
    INGESTION,
    SHORT_KINDS,
    ShortKind,
    claim_short,
    short_claim,
)
from worker.short_reconcile import expired_short_leases, lost_short_messages

KINDS = {kind.name: kind for kind in SHORT_KINDS}


@pytest.fixture
def settings(service_db: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """The test's settings, with a producer on this test's broker folder."""
    monkeypatch.setattr(dispatch, "_producer", None)
    dispatch.prepare_broker(service_db)
    yield service_db


@pytest.fixture
def waiting_row(make_job: Callable[..., str], settings: Settings) -> Callable[[ShortKind], str]:
    """A row of `kind` that awaits its task, as the API or the relay leaves it; its id."""

    def make(kind: ShortKind) -> str:
        job_id = make_job(status="succeeded")
        with session_scope() as session:
            job = session.get(Job, job_id)
            assert job is not None
            if kind is INGESTION:
                row_id = new_id("ds")
                session.add(Dataset(id=row_id, tenant="t", name="d", status="validating"))
                return row_id
            checkpoint_id = new_id("ckpt")
            session.add(Checkpoint(id=checkpoint_id, job_id=job_id, step=1, epoch=0, path="x",
                                   size_bytes=1, sha256="0" * 64))
            if kind is EVALUATION:
                session.flush()
                session.execute(update(Checkpoint).where(Checkpoint.id == checkpoint_id)
                                .values(**evaluation_request()))
                return checkpoint_id
            row_id = new_id("emb")
            session.add(EmbeddingJob(id=row_id, tenant="t", job_id=job_id,
                                     checkpoint_id=checkpoint_id, dataset_id=job.dataset_id,
                                     layer="backbone", status="queued"))
            return row_id

    return make


def row_of(kind: ShortKind, row_id: str) -> Any:
    with session_scope() as session:
        row = session.get(kind.model, row_id)
        session.expunge(row)
    return row


def expire(kind: ShortKind, row_id: str) -> None:
    """The lease runs out, as when its worker was killed with -9."""
    with session_scope() as session:
        session.execute(update(kind.model).where(kind.model.id == row_id)
                        .values(task_lease_expires_at=utcnow() - timedelta(seconds=1)))


def messages_for(settings: Settings, kind: ShortKind, row_id: str) -> int:
    waiting, _ = broker_messages(settings, settings.short_queue)
    return waiting[(kind.task, row_id)]


@pytest.mark.parametrize("name", KINDS)
def test_a_claim_takes_a_waiting_row_once(
    settings: Settings, waiting_row: Callable[[ShortKind], str], name: str
) -> None:
    kind = KINDS[name]
    row_id = waiting_row(kind)
    claim = claim_short(kind, row_id, settings)
    assert claim is not None and claim.token == 1
    row = row_of(kind, row_id)
    assert (row.task_token, row.task_attempts) == (1, 1)
    left = (as_utc(row.task_lease_expires_at) - utcnow()).total_seconds()
    assert settings.short_task_lease_s - 5 < left <= settings.short_task_lease_s
    assert claim_short(kind, row_id, settings) is None  # a duplicate delivery
    assert row_of(kind, row_id).task_attempts == 1


def test_an_embedding_claim_moves_the_job_to_running(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(EMBEDDING)
    assert claim_short(EMBEDDING, row_id, settings) is not None
    assert row_of(EMBEDDING, row_id).status == "running"


@pytest.mark.parametrize(
    ("name", "values"),
    [
        ("ingestion", {"status": "ready"}),
        ("ingestion", {"status": "failed"}),
        ("embedding", {"status": "succeeded"}),
        ("embedding", {"status": "failed"}),
        ("evaluation", {"evaluation_requested_at": None}),
    ],
)
def test_a_row_that_moved_on_is_not_claimed(
    settings: Settings, waiting_row: Callable[[ShortKind], str], name: str,
    values: dict[str, Any],
) -> None:
    kind = KINDS[name]
    row_id = waiting_row(kind)
    with session_scope() as session:
        session.execute(update(kind.model).where(kind.model.id == row_id).values(**values))
    assert claim_short(kind, row_id, settings) is None
    assert row_of(kind, row_id).task_token == 0


@pytest.mark.parametrize("name", KINDS)
def test_an_expired_lease_is_requeued_and_its_lost_worker_cannot_write(
    settings: Settings, waiting_row: Callable[[ShortKind], str], name: str
) -> None:
    kind = KINDS[name]
    row_id = waiting_row(kind)
    lost = claim_short(kind, row_id, settings)
    assert lost is not None
    assert lost.renew() and not lost.lost.is_set()
    expire(kind, row_id)

    assert expired_short_leases(settings) == 1
    row = row_of(kind, row_id)
    assert (row.task_token, row.task_attempts, row.task_lease_expires_at) == (2, 1, None)
    assert messages_for(settings, kind, row_id) == 1
    if kind is EMBEDDING:
        assert row.status == "queued"
    assert not lost.renew() and lost.lost.is_set()
    with session_scope() as session:
        assert not lost.finish(session) and not lost.holds(session)

    successor = claim_short(kind, row_id, settings)
    assert successor is not None and successor.token == 3
    assert row_of(kind, row_id).task_attempts == 2
    with session_scope() as session:
        assert successor.holds(session)
        assert successor.finish(session)
    assert row_of(kind, row_id).task_lease_expires_at is None


def test_a_live_lease_is_left_alone(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(INGESTION)
    assert claim_short(INGESTION, row_id, settings) is not None
    assert expired_short_leases(settings) == 0
    assert row_of(INGESTION, row_id).task_token == 1


def test_an_embedding_job_left_running_before_leases_is_requeued(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(EMBEDDING)
    with session_scope() as session:  # as an unleased claim before migration 0008 left it
        session.execute(update(EmbeddingJob).where(EmbeddingJob.id == row_id)
                        .values(status="running"))
    assert expired_short_leases(settings) == 1
    row = row_of(EMBEDDING, row_id)
    assert (row.status, row.task_token) == ("queued", 1)
    assert messages_for(settings, EMBEDDING, row_id) == 1


def lose_every_claim(settings: Settings, kind: ShortKind, row_id: str) -> None:
    for _ in range(settings.short_task_max_attempts):
        assert claim_short(kind, row_id, settings) is not None
        expire(kind, row_id)
        assert expired_short_leases(settings) == 1


def test_a_dataset_whose_every_claim_was_lost_fails_with_worker_lost(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(INGESTION)
    lose_every_claim(settings, INGESTION, row_id)
    row = row_of(INGESTION, row_id)
    assert (row.status, row.error_code, row.task_lease_expires_at) == (
        "failed", "worker_lost", None)
    assert "3 times" in row.error_message and "SWAV_SHORT_TASK_MAX_ATTEMPTS" in row.error_message
    assert claim_short(INGESTION, row_id, settings) is None
    assert messages_for(settings, INGESTION, row_id) == 2  # sent again after the first two


def test_an_embedding_job_whose_every_claim_was_lost_fails_with_worker_lost(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(EMBEDDING)
    lose_every_claim(settings, EMBEDDING, row_id)
    row = row_of(EMBEDDING, row_id)
    assert (row.status, row.error_code) == ("failed", "worker_lost")
    assert row.finished_at is not None


def test_an_evaluation_whose_every_claim_was_lost_is_cleared_with_its_reason(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(EVALUATION)
    lose_every_claim(settings, EVALUATION, row_id)
    row = row_of(EVALUATION, row_id)
    assert row.evaluation_requested_at is None
    assert row.evaluation_error["code"] == "worker_lost"
    assert "POST /v1/checkpoints/{id}/evaluate" in row.evaluation_error["message"]
    # A new request starts afresh: its own attempts, no old error.
    with session_scope() as session:
        session.execute(update(Checkpoint).where(Checkpoint.id == row_id)
                        .values(**evaluation_request()))
    row = row_of(EVALUATION, row_id)
    assert (row.task_attempts, row.evaluation_error) == (0, None)
    assert claim_short(EVALUATION, row_id, settings) is not None


@pytest.mark.parametrize("name", KINDS)
def test_an_unclaimed_row_whose_message_was_lost_is_sent_again_once(
    settings: Settings, waiting_row: Callable[[ShortKind], str], name: str
) -> None:
    kind = KINDS[name]
    row_id = waiting_row(kind)
    assert lost_short_messages(settings) == 0  # just made: its message may be on its way
    long_ago = utcnow() - timedelta(seconds=settings.resend_after_s + 1)
    with session_scope() as session:
        session.execute(update(kind.model).where(kind.model.id == row_id)
                        .values(task_sent_at=long_ago))
    assert lost_short_messages(settings) == 1
    assert messages_for(settings, kind, row_id) == 1
    with session_scope() as session:  # still unclaimed later: its message is waiting
        session.execute(update(kind.model).where(kind.model.id == row_id)
                        .values(task_sent_at=long_ago))
    assert lost_short_messages(settings) == 0
    assert messages_for(settings, kind, row_id) == 1


def test_a_claimed_row_is_not_sent_again(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    row_id = waiting_row(INGESTION)
    assert claim_short(INGESTION, row_id, settings) is not None
    with session_scope() as session:
        session.execute(update(Dataset).where(Dataset.id == row_id).values(
            task_sent_at=utcnow() - timedelta(seconds=settings.resend_after_s + 1)))
    assert lost_short_messages(settings) == 0


def test_the_heartbeat_renews_the_lease_while_the_task_runs(
    settings: Settings, waiting_row: Callable[[ShortKind], str]
) -> None:
    fast = settings.model_copy(update={"short_task_lease_s": 0.3})
    row_id = waiting_row(INGESTION)
    with short_claim(INGESTION, row_id, fast) as claim:
        assert claim is not None
        first = as_utc(row_of(INGESTION, row_id).task_lease_expires_at)
        deadline = utcnow() + timedelta(seconds=30)
        while as_utc(row_of(INGESTION, row_id).task_lease_expires_at) <= first:
            assert utcnow() < deadline, "the lease was never renewed"
            time.sleep(0.05)
        assert not claim.lost.is_set()
