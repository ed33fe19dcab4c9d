"""Learning rate as a pure function of the step, so that resume needs only the step number."""

from __future__ import annotations

import math


def learning_rate(
    step: int,
    total_steps: int,
    warmup_steps: int,
    base_lr: float,
    final_lr: float,
    start_warmup_lr: float = 0.0,
) -> float:
    """Linear warm-up from start_warmup_lr to base_lr, then a cosine down to final_lr.

    The schedule of the SwAV reference (per iteration, not per epoch); `step` counts
    from 0 and the last step, total_steps - 1, lands on final_lr.
    """
    if step < warmup_steps:
        return start_warmup_lr + (base_lr - start_warmup_lr) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))
