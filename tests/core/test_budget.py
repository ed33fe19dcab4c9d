"""A time budget instead of epochs: the fit from measured step times, refits when the pace
changes, and a real run that ends on its budget and keeps its fit across a resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from swav_core.budget import (
    MAX_WARMUP_SHARE,
    REFIT_EVERY,
    SKIPPED_STEPS,
    BudgetFitter,
    fitted_steps,
)
from swav_core.checkpoint import list_checkpoints, load_checkpoint
from swav_core.presets import config_from
from swav_core.trainer import train


def test_fitted_steps_pay_for_their_checkpoints() -> None:
    # 100 s left, 0.5 s a step, a 2 s checkpoint every 20 steps and one at the end:
    # n * 0.5 + 2 * (n / 20 + 1) = 100  ->  n = 98 / 0.6 = 163.3
    assert fitted_steps(100.0, 0.5, 2.0, 1 / 20) == 163
    assert fitted_steps(100.0, 0.5, 0.0, 0.0) == 200
    assert fitted_steps(1.0, 5.0, 0.0, 0.0) == 1  # never less than one step


def feed(fitter: BudgetFitter, step_s: float, steps: int, t0: float = 0.0) -> list[Any]:
    fits = []
    for s in range(1, steps + 1):
        fit = fitter.observe(s, t0 + s * step_s, lambda: 0.0, 0.0)
        if fit is not None:
            fits.append(fit)
    return fits


def test_the_fit_uses_the_measured_pace_and_clamps_the_warmup() -> None:
    fitter = BudgetFitter(100.0, started_at=0.0, steps_per_epoch=50, warmup_steps=1000)
    fit = feed(fitter, 0.25, 40)[0]
    # measured from step 2 until 3% of the budget (3 s = 12 steps) has passed
    assert fit.fitted_at_step == SKIPPED_STEPS + 12
    assert fit.step_time_s == pytest.approx(0.25)
    # 100 s - 3.5 s elapsed at step 14, at 0.25 s a step: 386 more
    assert fit.total_steps == 14 + 386
    assert fit.epochs == 8  # ceil(400 / 50)
    assert fit.warmup_steps == int(MAX_WARMUP_SHARE * 400)


def test_a_slower_pace_refits_and_a_steady_one_does_not() -> None:
    fitter = BudgetFitter(100.0, started_at=0.0, steps_per_epoch=50, warmup_steps=0)
    first = feed(fitter, 0.25, 20)[0]
    steady = [
        fitter.observe(s, s * 0.25, lambda: 0.0, 0.0) for s in range(21, 100)
    ]
    assert not any(steady)
    # from step 100 (25 s) the machine takes 0.5 s a step: the next check refits
    refits = []
    for k in range(1, 60):
        fit = fitter.observe(100 + k, 25.0 + 0.5 * k, lambda: 0.0, 0.0)
        if fit is not None:
            refits.append(fit)
    # the first check's window mixes both paces; by the next one the pace is 0.5 s
    assert [r.refits for r in refits] == list(range(1, len(refits) + 1))
    refit = refits[-1]
    assert refit.step_time_s == pytest.approx(0.5)
    elapsed = 25.0 + 0.5 * (refit.fitted_at_step - 100)
    assert elapsed >= 25.0 + REFIT_EVERY * 100 - 0.5
    assert refit.total_steps == refit.fitted_at_step + int((100 - elapsed) / 0.5)
    assert refit.total_steps < first.total_steps


def test_a_slowdown_after_the_last_pace_check_ends_the_run_at_its_deadline() -> None:
    fitter = BudgetFitter(100.0, started_at=0.0, steps_per_epoch=50, warmup_steps=0)
    fits = feed(fitter, 0.25, 368)  # 92 s, past the last pace check (90 s)
    assert [f.refits for f in fits] == [0]  # a steady pace: fitted once, never cut
    planned = fits[0].total_steps
    now, step, ended = 92.0, 368, None
    while ended is None and step < planned:
        step, now = step + 1, now + 1.0  # four times slower: 8 s would take 32 s
        ended = fitter.observe(step, now, lambda: 0.0, 0.0)
    assert ended is not None and ended.refits == 1
    # it ends at the first step after which one more would pass the deadline
    assert ended.total_steps == ended.fitted_at_step == step < planned
    assert now <= 100.0 < now + 1.0


def test_a_steady_run_keeps_every_fitted_step() -> None:
    fitter = BudgetFitter(100.0, started_at=0.0, steps_per_epoch=50, warmup_steps=0)
    fits = feed(fitter, 0.25, 400)
    assert [f.total_steps for f in fits] == [400]  # the last one ends on the deadline


def events_of(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    import json

    lines = (run_dir / "events.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if e["type"] == kind]


def test_a_budgeted_run_ends_on_its_budget(shapes_dir: Path, tmp_path: Path) -> None:
    config = config_from("cpu-tiny", budget_s=20.0, checkpoint_every_epochs=1)
    start = time.monotonic()
    result = train(config, shapes_dir, tmp_path / "run")
    elapsed = time.monotonic() - start
    assert result.status == "completed"
    # The budget counts from the start of train(); 5% is the promise, for steps short
    # next to it (a run ends on a step: within half a step of its fit, ~0.1 s here alone).
    step_s = events_of(tmp_path / "run", "budget_fitted")[0]["step_time_s"]
    assert abs(elapsed - 20.0) <= max(0.05 * 20.0, 1.5 * step_s), (elapsed, step_s)
    fits = events_of(tmp_path / "run", "budget_fitted")
    assert len(fits) == 1
    last = (events_of(tmp_path / "run", "budget_refitted") or fits)[-1]
    assert result.step == result.total_steps == last["total_steps"]
    started = events_of(tmp_path / "run", "started")[0]
    assert started["total_steps"] is None and started["budget_s"] == 20.0
    # the lr schedule ran to its end: the last logged lr is near final_lr
    metrics = events_of(tmp_path / "run", "metrics")
    assert metrics[-1]["lr"] < 0.05 * config.base_lr
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[0].path)
    assert final["schedule_fit"]["total_steps"] == result.total_steps


def test_a_resumed_budgeted_run_keeps_its_fit(shapes_dir: Path, tmp_path: Path) -> None:
    config = config_from("cpu-tiny", budget_s=10.0)
    seen: list[dict[str, Any]] = []

    def stop() -> bool:  # a few steps after the fit
        fitted = [e for e in seen if e["type"] == "budget_fitted"]
        return bool(fitted) and seen[-1].get("step", 0) >= fitted[0]["fitted_at_step"] + 2

    first = train(config, shapes_dir, tmp_path / "run", callbacks=[seen.append],
                  should_stop=stop)
    assert first.status == "stopped"
    fitted = events_of(tmp_path / "run", "budget_fitted")
    assert len(fitted) == 1
    planned = (events_of(tmp_path / "run", "budget_refitted") or fitted)[-1]["total_steps"]
    second = train(config, shapes_dir, tmp_path / "run")
    assert second.status == "completed"
    assert len(events_of(tmp_path / "run", "budget_fitted")) == 1  # not measured again
    refits = events_of(tmp_path / "run", "budget_refitted")
    assert second.total_steps == (refits[-1]["total_steps"] if refits else planned)
