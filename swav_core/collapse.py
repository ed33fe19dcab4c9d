"""Sustained collapse: detected over a window of steps, answered by a rollback with sharper codes.

A collapsed SwAV network maps every image to about the same z: all samples then score the
prototypes alike, Sinkhorn spreads every sample evenly over them (code entropy ln K) and
one prototype is the argmax of nearly every sample; or codes and predictions are both
uniform (loss ln K), so the swapped prediction teaches nothing. A freshly initialised
network looks much the same for a while (random features of different images are highly
similar), so one step near ln K means nothing early on; the signal is a window of such
steps after warm-up and after the prototypes are released.

On a sustained collapse the trainer goes back to the last checkpoint saved before the
window began, with `recovered_config`: Sinkhorn's epsilon halved (capped at the paper's
0.05, so a too-smooth epsilon is brought back to it) and the prototypes frozen for
another window, at most `MAX_RECOVERIES` times; then the run fails with `collapsed`.
"""

from __future__ import annotations

import math
from collections import deque

from swav_core.config import TrainConfig
from swav_core.loss import CollapseDiagnostics

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
