"""RNG states through a checkpoint: the same draws after a restore, numpy's cached gaussian
included."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from swav_core.checkpoint import load_checkpoint, save_checkpoint
from swav_core.rng_state import capture_rng_state, restore_rng_state


def draw_all() -> list[Any]:
    return [torch.rand(5), np.random.rand(5), np.random.randn(3), random.random()]


def test_rng_state_round_trip_through_a_checkpoint(tmp_path: Path) -> None:
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)
    info = save_checkpoint(tmp_path, {"rng": capture_rng_state()}, step=1, keep_last=1)
    first = draw_all()

    restore_rng_state(load_checkpoint(info.path)["rng"])
    second = draw_all()

    assert torch.equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    np.testing.assert_array_equal(first[2], second[2])
    assert first[3] == second[3]
