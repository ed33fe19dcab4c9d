"""The learning-rate schedule against facebookresearch/swav's, written out with numpy.

The reference builds the whole schedule up front: np.linspace(start_warmup, base_lr,
iters_per_epoch * warmup_epochs), then for t in range(iters_per_epoch * (epochs -
warmup_epochs)) final_lr + 0.5 (base_lr - final_lr)(1 + cos(pi t / that count)).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from swav_core.schedule import learning_rate


def reference_schedule(
    iters_per_epoch: int, epochs: int, warmup_epochs: int, base: float, final: float, start: float
) -> np.ndarray:
    warmup = np.linspace(start, base, iters_per_epoch * warmup_epochs)
    n = iters_per_epoch * (epochs - warmup_epochs)
    cosine = np.array(
        [final + 0.5 * (base - final) * (1 + math.cos(math.pi * t / n)) for t in range(n)]
    )
    return np.concatenate((warmup, cosine))


@pytest.mark.parametrize(
    ("iters", "epochs", "warmup", "base", "final", "start"),
    [
        (5, 20, 10, 4.8, 0.0048, 0.3),  # imagenet-800ep's shape, shortened
        (7, 6, 0, 0.6, 0.0006, 0.0),  # small-batch: no warm-up
        (3, 4, 1, 0.1, 0.001, 0.0),
    ],
)
def test_matches_the_reference_schedule(
    iters: int, epochs: int, warmup: int, base: float, final: float, start: float
) -> None:
    expected = reference_schedule(iters, epochs, warmup, base, final, start)
    total = iters * epochs
    got = [learning_rate(s, total, iters * warmup, base, final, start) for s in range(total)]
    np.testing.assert_allclose(got, expected, rtol=1e-13, atol=0)


def test_warmup_reaches_base_on_its_last_step_and_the_cosine_starts_there() -> None:
    assert learning_rate(9, 100, 10, 1.0, 0.0, 0.3) == pytest.approx(1.0, abs=1e-15)
    assert learning_rate(10, 100, 10, 1.0, 0.0, 0.3) == pytest.approx(1.0, abs=1e-15)
    assert learning_rate(0, 100, 10, 1.0, 0.0, 0.3) == pytest.approx(0.3, abs=1e-15)


def test_steps_past_the_end_keep_the_last_value() -> None:
    last = learning_rate(99, 100, 0, 1.0, 0.01)
    assert learning_rate(150, 100, 0, 1.0, 0.01) == last > 0.01
