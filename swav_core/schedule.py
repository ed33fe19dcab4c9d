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
    """The facebookresearch/swav schedule, per iteration: linear warm-up, then a cosine.

    As in the reference, warm-up is `linspace(start_warmup_lr, base_lr, W)` over its
    W steps (step W - 1 lands on base_lr), and step W + t of the remaining N = total - W
    takes final_lr + (base_lr - final_lr) (1 + cos(pi t / N)) / 2, so the last step is
    one cosine increment above final_lr. Steps past the end keep the last value.
    """
    if step < warmup_steps:
        if warmup_steps == 1:
            return start_warmup_lr
        return start_warmup_lr + (base_lr - start_warmup_lr) * step / (warmup_steps - 1)
    decay_steps = max(1, total_steps - warmup_steps)
    t = min(step - warmup_steps, decay_steps - 1)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * t / decay_steps))
