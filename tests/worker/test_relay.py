"""The relay (worker/relay.py): the trainer's events.jsonl into the database, under the
lease, losing nothing to a partial line or a refused write."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from swav_service.db import session_scope
from swav_service.job_state import change_status
from swav_service.layout import job_run_dir
from swav_service.models import Checkpoint, Job, JobEvent
from swav_service.settings import Settings
from worker.lease import Lease, LeaseLost, claim
from worker.relay import Relay


def metrics(step: int, loss: float) -> dict[str, Any]:
    return {"type": "metrics", "step": step, "total_steps": 10, "epoch": 0, "eta_s": 9.0,
            "loss": loss}


def append(run_dir: Path, *events: dict[str, Any], partial: str = "") -> None:
    with (run_dir / "events.jsonl").open("a") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
        f.write(partial)


def event_types(job_id: str) -> list[str]:
    with session_scope() as session:
        return list(session.scalars(
            select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.seq)
        ))


@pytest.fixture
def running(make_job: Callable[..., str], service_db: Settings) -> tuple[Lease, Path]:
    claimed = claim(make_job(), service_db)
    assert claimed is not None
    run_dir = job_run_dir(service_db, claimed[0].job_id)
    run_dir.mkdir(parents=True)
    return claimed[0], run_dir


def job_row(job_id: str) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_partial_line_waits_for_its_end(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    lease, run_dir = running
    relay = Relay(lease, run_dir, service_db)
    half = json.dumps(metrics(2, 0.5))
    append(run_dir, metrics(1, 0.9), partial=half[:20])
    relay.poll()
    assert (job_row(lease.job_id).step, relay.offset) == (1, len(json.dumps(metrics(1, 0.9))) + 1)
    append(run_dir, partial=half[20:] + "\n")
    relay.poll()
    job = job_row(lease.job_id)
    assert (job.step, job.total_steps, job.metrics) == (2, 10, {"loss": 0.5})


def test_metric_events_are_logged_at_most_once_per_interval(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    lease, run_dir = running
    relay = Relay(lease, run_dir, service_db.model_copy(update={"events_metrics_every_s": 3600}))
    append(run_dir, metrics(1, 0.9))
    relay.poll()
    append(run_dir, metrics(2, 0.8), metrics(3, 0.7))
    relay.poll()
    assert event_types(lease.job_id).count("metrics") == 1  # the first, then throttled
    relay.poll(flush=True)  # the run's end keeps the last one
    assert event_types(lease.job_id).count("metrics") == 2
    assert job_row(lease.job_id).step == 3


def test_a_refused_write_keeps_the_events_for_the_next_owner(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    lease, run_dir = running
    relay = Relay(lease, run_dir, service_db)
    append(run_dir, metrics(1, 0.9))
    with session_scope() as session:
        change_status(session, lease.job_id, "queued")
    claim(lease.job_id, service_db)  # another runner holds the job now
    with pytest.raises(LeaseLost):
        relay.poll()
    assert relay.offset == 0
    assert job_row(lease.job_id).step == 0


def test_a_checkpoint_saved_again_at_its_step_keeps_one_row(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    lease, run_dir = running
    relay = Relay(lease, run_dir, service_db)
    path = run_dir / "checkpoints" / "step_4.pt"
    path.parent.mkdir()
    path.write_bytes(b"weights")

    def saved(sha: str) -> dict[str, Any]:
        return {"type": "checkpoint", "path": str(path), "step": 4, "epoch": 1, "final": False,
                "size_bytes": 7, "sha256": sha, "loss": 0.4}

    append(run_dir, saved("a" * 64))
    relay.poll()
    append(run_dir, saved("b" * 64))  # a resumed run saved the same step again
    relay.poll()
    with session_scope() as session:
        rows = session.scalars(select(Checkpoint).where(Checkpoint.job_id == lease.job_id)).all()
        assert [(r.step, r.sha256, r.available) for r in rows] == [(4, "b" * 64, True)]
        assert rows[0].path == str(path.relative_to(service_db.artifacts))
    path.unlink()  # the trainer pruned it; the next checkpoint event notices
    append(run_dir, {**saved("c" * 64), "step": 8, "path": str(path.with_name("step_8.pt"))})
    path.with_name("step_8.pt").write_bytes(b"weights")
    relay.poll()
    with session_scope() as session:
        available = dict(session.execute(
            select(Checkpoint.step, Checkpoint.available).where(
                Checkpoint.job_id == lease.job_id)
        ).tuples().all())
    assert available == {4: False, 8: True}


def test_start_at_end_skips_what_an_earlier_run_relayed(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    lease, run_dir = running
    append(run_dir, metrics(1, 0.9), metrics(2, 0.8))
    relay = Relay(lease, run_dir, service_db)
    relay.start_at_end()
    append(run_dir, {"type": "resumed", "step": 2, "epoch": 0})
    relay.poll()
    assert event_types(lease.job_id)[-1] == "resumed"
    assert job_row(lease.job_id).step == 2
    assert "metrics" not in event_types(lease.job_id)


def test_a_long_run_keeps_a_bounded_log_that_spans_it(
    running: tuple[Lease, Path], service_db: Settings
) -> None:
    """Past SWAV_MAX_EVENTS_PER_JOB rows, every other metrics and epoch event goes (the
    first and newest stay), lifecycle events all stay, seqs only grow (so a cursor taken
    before a thinning still pages on), and a warning repeated every step is one row."""
    lease, run_dir = running
    cap = 40
    settings = service_db.model_copy(
        update={"events_metrics_every_s": 0, "max_events_per_job": cap}
    )
    relay = Relay(lease, run_dir, settings)
    append(run_dir, {"type": "started", "step": 0, "epoch": 0, "total_steps": 100})
    seen: list[int] = []
    cursor = 0
    for step in range(1, 101):
        warning = {"type": "warning", "code": "slow_loader", "message": "the loader is slow",
                   "step": step}
        append(run_dir, metrics(step, 1 / step), warning)
        if step % 10 == 0:
            append(run_dir, {"type": "epoch", "epoch": step // 10, "step": step, "loss": 0.1})
        relay.poll()
        with session_scope() as session:
            rows = session.execute(
                select(JobEvent.seq, JobEvent.type).where(
                    JobEvent.job_id == lease.job_id, JobEvent.seq > cursor
                ).order_by(JobEvent.seq)
            ).all()
            count = len(session.scalars(
                select(JobEvent.id).where(JobEvent.job_id == lease.job_id)).all())
        assert count <= cap, step
        seen += [seq for seq, _ in rows]
        cursor = rows[-1][0]  # what a reader paging with `after` holds next

    # The claim's "running" state, started, one warning row, 100 metrics, 10 epochs: a
    # reader paging along saw every seq once, in order, none reused.
    assert seen == list(range(1, 1 + 1 + 1 + 100 + 10 + 1))
    with session_scope() as session:
        events = session.execute(
            select(JobEvent.type, JobEvent.data)
            .where(JobEvent.job_id == lease.job_id).order_by(JobEvent.seq)
        ).all()
    kinds = [kind for kind, _ in events]
    assert kinds.count("started") == 1 and kinds.count("warning") == 1
    warning = next(data for kind, data in events if kind == "warning")
    assert (warning["count"], warning["step"], warning["last_step"]) == (100, 1, 100)
    steps = [data["step"] for kind, data in events if kind == "metrics"]
    assert steps[0] == 1 and steps[-1] == 100 and steps == sorted(steps)
    # Thinning keeps the seqs that are multiples of the smallest power-of-two stride that
    # leaves cap / 2 = 20 rows: 3 lifecycle rows and 4 pinned ones (first and newest metrics
    # and epoch) leave 13 strided ones over at most 113 seqs, so the stride is below
    # 2 x 113 / 13, and so is any gap in steps (each step took at least one seq).
    assert max(b - a for a, b in zip(steps, steps[1:], strict=False)) < 2 * 113 / 13
    epochs = [data["epoch"] for kind, data in events if kind == "epoch"]
    assert epochs[0] == 1 and epochs[-1] == 10
