"""Fitting the schedule to a wall-clock budget: measure the step time, then fix the steps.

A run with `budget_s` does not know its length in advance. It starts with the warm-up
of its config, measures how long a step takes once the first steps (allocator, loader
start) are behind it, and then fixes `total_steps` so that the cosine ends, and the last
checkpoint is written, when the budget does. The fit happens early (a few percent of
the budget) and is recorded as an event and in every checkpoint, so a resumed run keeps
it.

A machine can get slower or faster after the fit (another job starts beside this one,
evaluations run on the same cores). Every tenth of the budget the pace since the last
fit is checked; when it would miss the budget by more than 2%, the remaining steps are
fitted again (a `budget_refitted` event). Each refit bends the cosine a little, by the
size of the correction, which is better than a run that ends far past its budget or
stops before its learning rate has decayed.

After the last pace check the budget is still a deadline: when the pace says that one
more step and the final checkpoint would end past it, the run ends at this step (a
`budget_refitted` event whose `total_steps` is the step it was fitted at). A machine that
slows down in the last tenth then costs the run its last steps, not the user minutes past
the budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

# Steps left out of the measurement: the first ones pay for allocation and warm-up.
SKIPPED_STEPS = 2
# The measurement lasts at least this many steps and this fraction of the budget, and
# at most MAX_FRACTION of it: long enough to average out noise, short enough that the
# provisional schedule (the config's warm-up) covers it.
MIN_MEASURED_STEPS = 5
MIN_FRACTION = 0.03
MAX_FRACTION = 0.1
# The fitted warm-up takes at most this share of the fitted run.
MAX_WARMUP_SHARE = 0.25
# Pace checks: every REFIT_EVERY of the budget, until REFIT_UNTIL of it has passed; a
# projected miss above REFIT_TOLERANCE of the budget refits.
REFIT_EVERY = 0.1
REFIT_UNTIL = 0.9
REFIT_TOLERANCE = 0.02


@dataclass(frozen=True)
class ScheduleFit:
    """The schedule fixed for a budgeted run, with the measurement it came from."""

    total_steps: int
    warmup_steps: int
    epochs: int
    step_time_s: float
    measured_steps: int
    fitted_at_step: int
    budget_s: float
    refits: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def fitted_steps(
    remaining_s: float, step_time_s: float, checkpoint_s: float, checkpoints_per_step: float
) -> int:
    """How many more steps fit in `remaining_s`, paying for the checkpoints they cause.

    remaining = n * step_time + checkpoint_s * (n * checkpoints_per_step + 1), the 1
    being the final checkpoint; solved for n and rounded down, at least 1. A budget is a
    deadline: the run ends less than a step before it rather than up to half a step after,
    which leaves that fraction of a step for the child's exit and the job's bookkeeping.
    """
    per_step = step_time_s + checkpoint_s * checkpoints_per_step
    return max(1, math.floor((remaining_s - checkpoint_s) / per_step))


class BudgetFitter:
    """Feed it the clock after every step; it answers a `ScheduleFit` when one is made."""

    def __init__(
        self,
        budget_s: float,
        started_at: float,
        steps_per_epoch: int,
        warmup_steps: int,
        fit: ScheduleFit | None = None,
    ) -> None:
        self.budget_s = budget_s
        self.started_at = started_at
        self.steps_per_epoch = steps_per_epoch
        self.warmup_steps = warmup_steps
        self.fit = fit
        self.window_start: tuple[int, float] | None = None
        self.checkpoint_s = 0.0

    def elapsed(self, now: float) -> float:
        return now - self.started_at

    def observe(
        self,
        steps_done: int,
        now: float,
        checkpoint_cost_s: Callable[[], float],
        checkpoints_per_step: float,
    ) -> ScheduleFit | None:
        """After `steps_done` steps, at time `now`: a new fit when one is due, else None.

        `checkpoint_cost_s` is called once, at the first fit: what one checkpoint costs.
        """
        if self._one_more_step_would_pass_the_deadline(steps_done, now):
            return self._fit_ending_now(steps_done, now)
        if self.window_start is None:
            if steps_done >= SKIPPED_STEPS:
                self.window_start = (steps_done, now)
            return None
        first_step, first_time = self.window_start
        measured, spent = steps_done - first_step, now - first_time
        if self.fit is None:
            long_enough = measured >= MIN_MEASURED_STEPS and spent >= MIN_FRACTION * self.budget_s
            if not (long_enough or spent >= MAX_FRACTION * self.budget_s):
                return None
            self.checkpoint_s = checkpoint_cost_s()
            return self._fit(steps_done, now, spent / measured, measured, checkpoints_per_step)
        if spent < REFIT_EVERY * self.budget_s or measured < 1:
            return None
        self.window_start = (steps_done, now)
        if self.elapsed(now) > REFIT_UNTIL * self.budget_s:
            return None
        # The pace since the last check already includes its checkpoints' cost.
        pace = spent / measured
        projected = self.elapsed(now) + (self.fit.total_steps - steps_done) * pace
        if abs(projected + self.checkpoint_s - self.budget_s) <= REFIT_TOLERANCE * self.budget_s:
            return None
        return self._fit(steps_done, now, pace, measured, 0.0)

    def _one_more_step_would_pass_the_deadline(self, steps_done: int, now: float) -> bool:
        """Whether a fitted run with steps left would end past its budget if it took one
        more step and then its final checkpoint. The step's time is the pace since the last
        pace check (it includes the checkpoints written meanwhile, and a slowdown shows in
        it), or the fitted step time while that window is shorter than MIN_MEASURED_STEPS:
        one step that paid for a checkpoint is no pace."""
        if self.fit is None or self.window_start is None or steps_done >= self.fit.total_steps:
            return False
        first_step, first_time = self.window_start
        measured = steps_done - first_step
        step_s = (now - first_time) / measured if measured >= MIN_MEASURED_STEPS else (
            self.fit.step_time_s
        )
        return self.elapsed(now) + step_s + self.checkpoint_s > self.budget_s

    def _fit_ending_now(self, steps_done: int, now: float) -> ScheduleFit:
        assert self.fit is not None
        self.fit = replace(
            self.fit,
            total_steps=steps_done,
            warmup_steps=min(self.fit.warmup_steps, steps_done),
            epochs=math.ceil(steps_done / self.steps_per_epoch),
            fitted_at_step=steps_done,
            refits=self.fit.refits + 1,
        )
        self.window_start = (steps_done, now)
        return self.fit

    def _fit(
        self,
        steps_done: int,
        now: float,
        step_time: float,
        measured: int,
        checkpoints_per_step: float,
    ) -> ScheduleFit:
        remaining = self.budget_s - self.elapsed(now)
        more = fitted_steps(remaining, step_time, self.checkpoint_s, checkpoints_per_step)
        total = steps_done + more
        if self.fit is None:
            warmup = min(self.warmup_steps, max(steps_done, int(MAX_WARMUP_SHARE * total)))
            fit = ScheduleFit(
                total_steps=total,
                warmup_steps=warmup,
                epochs=math.ceil(total / self.steps_per_epoch),
                step_time_s=step_time,
                measured_steps=measured,
                fitted_at_step=steps_done,
                budget_s=self.budget_s,
            )
        else:
            fit = replace(
                self.fit,
                total_steps=total,
                warmup_steps=min(self.fit.warmup_steps, total),
                epochs=math.ceil(total / self.steps_per_epoch),
                step_time_s=step_time,
                measured_steps=measured,
                fitted_at_step=steps_done,
                refits=self.fit.refits + 1,
            )
        self.fit = fit
        self.window_start = (steps_done, now)
        return fit
