"""Collapse: detected only when sustained after warm-up, rolled back with sharper codes,
and reported as `collapsed` when it comes back after the last allowed rollback."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from swav_core.checkpoint import list_checkpoints, load_checkpoint
from swav_core.collapse import MAX_RECOVERIES, CollapseMonitor, looks_collapsed
from swav_core.errors import CollapsedError
from swav_core.loss import CollapseDiagnostics
from swav_core.presets import config_from
from swav_core.trainer import train

K = 16
LN_K = math.log(K)


def diagnostics(entropy: float, usage: float, loss_over_ln_k: float) -> CollapseDiagnostics:
    return CollapseDiagnostics(entropy, usage, loss_over_ln_k, abs(loss_over_ln_k - 1) < 0.01)


UNIFORM = diagnostics(LN_K, 1 / K, 1.0)
HEALTHY_EARLY = diagnostics(0.95 * LN_K, 0.33, 0.96)  # MNIST just after warm-up


def test_one_step_is_collapsed_only_with_uniform_codes_and_no_prediction() -> None:
    assert looks_collapsed(UNIFORM, K, 64)
    assert looks_collapsed(diagnostics(LN_K, 0.5, 1.0), K, 64)  # uniform predictions
    assert looks_collapsed(diagnostics(LN_K, 2 / K, 0.9), K, 64)  # one or two prototypes
    assert not looks_collapsed(HEALTHY_EARLY, K, 64)
    assert not looks_collapsed(diagnostics(0.5 * LN_K, 1 / K, 1.0), K, 64)  # sharp codes


def test_the_monitor_needs_a_whole_window_after_its_start() -> None:
    monitor = CollapseMonitor(K, 64, start_step=10, window=5)
    assert not any(monitor.observe(step, UNIFORM) for step in range(10))  # warm-up: ignored
    assert [monitor.observe(step, UNIFORM) for step in range(10, 15)] == [False] * 4 + [True]
    assert monitor.onset_step == 10
    monitor = CollapseMonitor(K, 64, start_step=0, window=5)
    for step in range(4):
        monitor.observe(step, UNIFORM)
    monitor.observe(4, HEALTHY_EARLY)  # one healthy step starts the count again
    assert [monitor.observe(s, UNIFORM) for s in range(5, 10)] == [False] * 4 + [True]
    assert monitor.onset_step == 5


def events(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_a_sustained_collapse_rolls_back_with_a_sharper_epsilon(
    shapes_dir: Path, tmp_path: Path
) -> None:
    """epsilon 1.0 makes the codes uniform, the loss settles at ln K; the rollback brings
    epsilon to the paper's 0.05, and the run then learns and completes."""
    config = config_from("cpu-tiny", epochs=12, epsilon=1.0, checkpoint_every_steps=5,
                         keep_last=20)
    result = train(config, shapes_dir, tmp_path / "run")
    assert result.status == "completed"
    log = events(tmp_path / "run")
    recoveries = [e for e in log if e["type"] == "collapse_recovery"]
    assert len(recoveries) == 1
    recovery = recoveries[0]
    assert recovery["epsilon"] == 0.05 and recovery["attempt"] == 1
    assert recovery["restart_step"] < recovery["collapsed_at_step"]
    final = load_checkpoint(list_checkpoints(tmp_path / "run")[0].path)
    assert final["config"]["epsilon"] == 0.05
    assert final["recoveries"][0]["overrides"]["epsilon"] == 0.05
    after = [e for e in log if e["type"] == "metrics" and e["time"] > recovery["time"]]
    assert after[-1]["code_entropy"] < 0.98 * LN_K  # the codes are no longer uniform
    assert not [e for e in log if e["type"] == "warning"]


def test_a_collapse_that_returns_fails_with_collapsed(tmp_path: Path) -> None:
    """Identical gray images (and no colour jitter) give every crop the same z: the codes
    stay uniform whatever epsilon, so both rollbacks fail and the run raises."""
    folder = tmp_path / "gray" / "all"
    folder.mkdir(parents=True)
    for i in range(64):
        Image.new("RGB", (32, 32), (90, 90, 90)).save(folder / f"{i}.png")
    config = config_from("cpu-tiny", epochs=40, color_jitter_strength=0.0)
    with pytest.raises(CollapsedError) as raised:
        train(config, folder.parent, tmp_path / "run")
    assert raised.value.code == "collapsed"
    assert raised.value.recoveries == MAX_RECOVERIES
    log = events(tmp_path / "run")
    assert [e["attempt"] for e in log if e["type"] == "collapse_recovery"] == [1, 2]
    assert [e["code"] for e in log if e["type"] == "warning"] == ["collapsed"]
