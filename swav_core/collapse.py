"""Sustained collapse: detected over a window of steps, answered by a rollback with sharper codes.

A collapsed SwAV network maps every image to about the same z: all samples then score the
prototypes alike, Sinkhorn spreads every sample evenly over them (code entropy ln K) and
one prototype is the argmax of nearly every sample; or codes and predictions are both
uniform (loss ln K), so the swapped prediction teaches nothing. A freshly initialised
network looks much the same for a while (random features of different images are highly
similar), so one step near ln K means nothing early on; the signal is a window of such
steps after warm-up and after the prototypes are released.

On a sustained collapse `roll_back` takes the run back to the last checkpoint saved before
the window began, with `recovered_config`: Sinkhorn's epsilon halved (capped at the
paper's 0.05, so a too-smooth epsilon is brought back to it) and the prototypes frozen
for another window, at most `MAX_RECOVERIES` times; then the run fails with `collapsed`.
"""

from __future__ import annotations

import math
from collections import deque
from pathlib import Path

from swav_core.checkpoint import list_checkpoints, load_checkpoint, remove_checkpoint
from swav_core.config import TrainConfig
from swav_core.errors import CollapsedError
from swav_core.events import EventSink
from swav_core.loss import CollapseDiagnostics
from swav_core.training_state import TrainingState

# A step looks collapsed when its codes are this close to uniform (entropy / ln K) ...
UNIFORM_CODES = 0.98
# ... and the predictions carry nothing either (loss / ln K, uniform predictions: 1), or
# every sample predicts the same prototype or two (usage at most this many of those
# that could be used). Healthy runs measured on MNIST sit near 0.95 ln K just after
# warm-up, below both marks.
NO_PREDICTION = 0.99
SINGLE_PROTOTYPE = 2
# The window: at least this many steps, or this share of the run when that is longer.
MIN_WINDOW_STEPS = 20
WINDOW_SHARE = 0.05
MAX_RECOVERIES = 2
PAPER_EPSILON = 0.05


def window_steps(total_steps: int) -> int:
    return max(MIN_WINDOW_STEPS, math.ceil(WINDOW_SHARE * total_steps))


def looks_collapsed(diagnostics: CollapseDiagnostics, n_prototypes: int, samples: int) -> bool:
    """One step's signals: near-uniform codes, and uniform predictions or one prototype
    predicted for all `samples` assigned samples."""
    if diagnostics.code_entropy < UNIFORM_CODES * math.log(n_prototypes):
        return False
    possible = min(samples, n_prototypes)
    single = diagnostics.prototype_usage * possible <= SINGLE_PROTOTYPE
    return single or diagnostics.loss_over_ln_k >= NO_PREDICTION


class CollapseMonitor:
    """Counts consecutive collapsed-looking steps once monitoring starts.

    `observe` returns True when the last `window` observed steps (from `start_step` on)
    all looked collapsed; `onset_step` is then the step before the first of them.
    """

    def __init__(self, n_prototypes: int, samples: int, start_step: int, window: int) -> None:
        self.n_prototypes = n_prototypes
        self.samples = samples
        self.start_step = start_step
        self.window = window
        self.recent: deque[int] = deque(maxlen=window)

    def observe(self, step: int, diagnostics: CollapseDiagnostics) -> bool:
        """`step` is the index of the step just taken (0-based)."""
        if step < self.start_step:
            return False
        if not looks_collapsed(diagnostics, self.n_prototypes, self.samples):
            self.recent.clear()
            return False
        self.recent.append(step)
        return len(self.recent) == self.window

    @property
    def onset_step(self) -> int:
        """The number of steps done before the collapsed window began."""
        return self.recent[0] if self.recent else 0


def recovered_config(config: TrainConfig, frozen_until: int) -> TrainConfig:
    """The config to restart with: sharper codes, prototypes frozen until `frozen_until`."""
    return config.with_overrides(
        epsilon=min(config.epsilon / 2, PAPER_EPSILON),
        freeze_prototypes=frozen_until,
        freeze_prototypes_unit="iterations",
    )


def roll_back(
    run: TrainingState,
    monitor: CollapseMonitor,
    frozen_until: int,
    run_dir: Path,
    emit: EventSink,
) -> tuple[TrainConfig, int]:
    """Restore the last checkpoint before the collapse with `recovered_config`; the new
    (config, frozen_until). Raises CollapsedError once MAX_RECOVERIES are spent."""
    collapsed_at = run.step
    if len(run.recoveries) >= MAX_RECOVERIES:
        emit("warning", code="collapsed", step=collapsed_at, message="the features collapsed")
        raise CollapsedError(collapsed_at, len(run.recoveries))
    good = [
        info
        for info in list_checkpoints(run_dir)
        if not info.final and info.step is not None and info.step <= monitor.onset_step
    ]
    for info in list_checkpoints(run_dir):  # checkpoints of the collapsed stretch
        if info.final or info.step is None or info.step > monitor.onset_step:
            remove_checkpoint(info.path)
    recoveries, fit, started_at = run.recoveries, run.fit, run.started_at
    if good:
        run.load_state_dict(load_checkpoint(good[0].path, map_location="cpu"))
    else:
        run.restart_from_scratch(run.config.seed)
    new_config = recovered_config(run.config, max(frozen_until, run.step + monitor.window))
    overrides = {
        "epsilon": new_config.epsilon,
        "freeze_prototypes": new_config.freeze_prototypes,
        "freeze_prototypes_unit": new_config.freeze_prototypes_unit,
    }
    run.fit, run.started_at = fit, started_at  # the budget is wall time: no refund
    run.recoveries = [*recoveries, {"at_step": collapsed_at, "overrides": overrides}]
    run.config = new_config
    emit(
        "collapse_recovery",
        collapsed_at_step=collapsed_at,
        restart_step=run.step,
        attempt=len(run.recoveries),
        max_attempts=MAX_RECOVERIES,
        epsilon=new_config.epsilon,
        freeze_prototypes=new_config.freeze_prototypes,
        message=(
            f"sustained collapse at step {collapsed_at}: back to step {run.step} with "
            f"epsilon {new_config.epsilon:g} and the prototypes frozen until step "
            f"{new_config.freeze_prototypes}"
        ),
    )
    return new_config, new_config.freeze_prototypes
