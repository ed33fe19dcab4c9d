"""Checkpoints on real files: atomic saves, checksums, pins, pruning, crash and fault recovery."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from swav_core.atomic import atomic_write_bytes
from swav_core.checkpoint import (
    CheckpointInfo,
    list_checkpoints,
    load_checkpoint,
    load_latest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    set_pinned,
    verify_checkpoint,
)
from swav_core.checkpoint_names import checkpoint_dir, sidecar_path
from swav_core.errors import CheckpointError
from swav_core.exports import model_from_checkpoint
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_core.queue import FeatureQueue
from swav_core.rng_state import capture_rng_state

REPO = Path(__file__).resolve().parents[2]


def small_state(step: int) -> dict[str, Any]:
    return {"step": step, "weights": torch.full((4,), float(step))}


def realistic_state() -> dict[str, Any]:
    torch.manual_seed(0)
    config = config_from("cpu-tiny", hidden_mlp=16, feat_dim=8, n_prototypes=10)
    model = SwAVModel.from_config(config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    z, scores = model([torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)])
    scores.sum().backward()
    optimizer.step()
    queue = FeatureQueue(2, 8, 8)
    queue.push([z[:4].detach(), z[4:].detach()])
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "queue": queue.state_dict(),
        "rng": capture_rng_state(),
        "config": config.model_dump(mode="json"),
        "epoch": 3,
        "step": 120,
    }


def assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b


def names(run_dir: Path) -> set[str]:
    return {p.name for p in checkpoint_dir(run_dir).iterdir()}


def test_save_load_round_trip_with_sidecar_checksum(tmp_path: Path) -> None:
    state = realistic_state()
    info = save_checkpoint(tmp_path, state, step=120, keep_last=2)

    assert info.path == tmp_path / "checkpoints" / "step-000000120.pt"
    assert (info.step, info.final) == (120, False)
    data = info.path.read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size == len(data)
    sidecar = json.loads(sidecar_path(info.path).read_text())
    assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_checkpoint(info.path)

    loaded = load_checkpoint(info.path)
    assert_same(state, loaded)
    assert list_checkpoints(tmp_path) == [info]

    model, config = model_from_checkpoint(loaded)
    assert config.model_dump(mode="json") == state["config"]
    assert_same(state["model"], model.state_dict())


def test_keep_last_prunes_to_newest_and_final_and_cleans_temp_files(tmp_path: Path) -> None:
    for step in (10, 20):
        save_checkpoint(tmp_path, small_state(step), step=step, keep_last=2)
    save_checkpoint(tmp_path, small_state(25), step=25, keep_last=2, final=True)
    folder = checkpoint_dir(tmp_path)
    dead_pid = 2**31 - 1
    (folder / f".step-000000030.pt.tmp-{dead_pid}-deadbeef").write_bytes(b"partial")
    (folder / "step-000000005.pt.sha256").write_text("{}")
    for step in (30, 40):
        save_checkpoint(tmp_path, small_state(step), step=step, keep_last=2)

    assert names(tmp_path) == {
        "final.pt",
        "final.pt.sha256",
        "step-000000030.pt",
        "step-000000030.pt.sha256",
        "step-000000040.pt",
        "step-000000040.pt.sha256",
    }
    infos = list_checkpoints(tmp_path)
    assert [(i.final, i.step) for i in infos] == [(True, 25), (False, 40), (False, 30)]
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded[1].final and loaded[0]["step"] == 25


def test_a_pinned_checkpoint_survives_pruning_until_unpinned(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path, small_state(10), step=10, keep_last=1)
    set_pinned(first.path, True)
    for step in (20, 30):
        save_checkpoint(tmp_path, small_state(step), step=step, keep_last=1)
    assert [i.step for i in list_checkpoints(tmp_path)] == [30, 10]
    assert verify_checkpoint(first.path)

    set_pinned(first.path, False)
    prune_checkpoints(tmp_path, keep_last=1)
    assert names(tmp_path) == {"step-000000030.pt", "step-000000030.pt.sha256"}


def test_an_orphan_pin_is_removed_by_the_next_prune(tmp_path: Path) -> None:
    (checkpoint_dir(tmp_path)).mkdir(parents=True)
    (checkpoint_dir(tmp_path) / "step-000000005.pt.keep").write_bytes(b"")
    save_checkpoint(tmp_path, small_state(10), step=10, keep_last=1)
    assert names(tmp_path) == {"step-000000010.pt", "step-000000010.pt.sha256"}


def test_a_pruned_checkpoint_takes_its_exports_with_it(tmp_path: Path) -> None:
    """Exports made for downloads go with their checkpoint when it is pruned; one written
    after its checkpoint was pruned (a download racing the trainer) goes at the next save."""
    first = save_checkpoint(tmp_path, small_state(10), step=10, keep_last=1)
    for suffix in (".onnx", ".timm.safetensors", ".model.safetensors", ".backbone.safetensors"):
        first.path.with_name("step-000000010" + suffix).write_bytes(b"export")
    final = save_checkpoint(tmp_path, small_state(15), step=15, keep_last=1, final=True)
    final.path.with_name("final.onnx").write_bytes(b"export")
    save_checkpoint(tmp_path, small_state(20), step=20, keep_last=1)
    kept = {"final.pt", "final.pt.sha256", "final.onnx"}
    assert names(tmp_path) == kept | {"step-000000020.pt", "step-000000020.pt.sha256"}

    (checkpoint_dir(tmp_path) / "step-000000020.onnx").write_bytes(b"export")
    (checkpoint_dir(tmp_path) / "step-000000010.onnx").write_bytes(b"late export")
    save_checkpoint(tmp_path, small_state(30), step=30, keep_last=2)
    assert names(tmp_path) == kept | {
        "step-000000020.pt", "step-000000020.pt.sha256", "step-000000020.onnx",
        "step-000000030.pt", "step-000000030.pt.sha256",
    }


_KILL_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from swav_core.checkpoint import save_checkpoint

    kill_on_call = int(sys.argv[2])
    calls = 0
    real_replace = os.replace

    def replace_then_die(src, dst):
        global calls
        calls += 1
        if calls == kill_on_call:
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    os.replace = replace_then_die
    save_checkpoint(sys.argv[1], {"step": 2, "weights": torch.ones(4)}, step=2, keep_last=2)
    """
)


@pytest.mark.parametrize("kill_on_call", [1, 2], ids=["before-sidecar", "before-checkpoint"])
def test_kill_before_rename_leaves_previous_checkpoint_loadable(
    tmp_path: Path, kill_on_call: int
) -> None:
    previous = save_checkpoint(tmp_path, small_state(1), step=1, keep_last=2)

    result = subprocess.run(
        [sys.executable, "-c", _KILL_DURING_SAVE, str(tmp_path), str(kill_on_call)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        timeout=120,
    )

    assert result.returncode == -9, result.stderr.decode()
    leftovers = names(tmp_path) - {"step-000000001.pt", "step-000000001.pt.sha256"}
    assert any(".tmp-" in name for name in leftovers)
    assert "step-000000002.pt" not in leftovers
    assert list_checkpoints(tmp_path) == [previous]
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None
    state, info = loaded
    assert info == previous and verify_checkpoint(info.path)
    assert_same(small_state(1), state)

    save_checkpoint(tmp_path, small_state(3), step=3, keep_last=2)
    assert names(tmp_path) == {
        f"step-00000000{s}.pt{suffix}" for s in (1, 3) for suffix in ("", ".sha256")
    }


def test_corrupt_newest_checkpoint_falls_back_to_previous(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    save_checkpoint(tmp_path, small_state(1), step=1, keep_last=3)
    newest = save_checkpoint(tmp_path, small_state(2), step=2, keep_last=3)
    data = bytearray(newest.path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 8] = bytes(b ^ 0xFF for b in data[middle : middle + 8])
    newest.path.write_bytes(bytes(data))

    assert not verify_checkpoint(newest.path)
    with pytest.raises(CheckpointError, match="sha256"):
        load_checkpoint(newest.path)
    with caplog.at_level(logging.WARNING, logger="swav_core.checkpoint"):
        loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded[1].step == 1
    assert "step-000000002.pt" in caplog.text


def test_missing_sidecar_makes_checkpoint_skipped(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, small_state(1), step=1, keep_last=3)
    newest = save_checkpoint(tmp_path, small_state(2), step=2, keep_last=3)
    sidecar_path(newest.path).unlink()

    assert not verify_checkpoint(newest.path)
    with pytest.raises(CheckpointError, match="sidecar"):
        load_checkpoint(newest.path)
    assert [i.sha256 for i in list_checkpoints(tmp_path)][0] is None
    loaded = load_latest_checkpoint(tmp_path)
    assert loaded is not None and loaded[1].step == 1


def test_no_checkpoints_gives_none_but_only_unusable_ones_raise(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path) is None
    only = save_checkpoint(tmp_path, small_state(1), step=1, keep_last=1)
    only.path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="none of the 1"):
        load_latest_checkpoint(tmp_path)


def test_disk_full_during_write_raises_and_keeps_previous(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    previous = save_checkpoint(tmp_path, small_state(1), step=1, keep_last=2)
    before = {name: (checkpoint_dir(tmp_path) / name).read_bytes() for name in names(tmp_path)}

    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(tmp_path, small_state(2), step=2, keep_last=2)
    monkeypatch.undo()

    after = {name: (checkpoint_dir(tmp_path) / name).read_bytes() for name in names(tmp_path)}
    assert after == before
    assert list_checkpoints(tmp_path) == [previous]
    assert verify_checkpoint(previous.path)


def test_atomic_write_bytes_replaces_or_leaves_untouched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "status.json"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"

    def fail(src: Any, dst: Any) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_bytes(target, b"three")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]


class _RunsCodeWhenUnpickled:
    """Unpickling this calls os.mkdir(marker): what an unrestricted torch.load would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_load_refuses_pickled_objects_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    info = save_checkpoint(
        tmp_path, {"payload": _RunsCodeWhenUnpickled(marker)}, step=1, keep_last=1
    )
    assert verify_checkpoint(info.path)

    with pytest.raises(CheckpointError, match="does not load"):
        load_checkpoint(info.path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):
        load_latest_checkpoint(tmp_path)
    assert not marker.exists()


def test_checkpoint_info_is_frozen(tmp_path: Path) -> None:
    info = save_checkpoint(tmp_path, small_state(1), step=1, keep_last=1)
    assert isinstance(info, CheckpointInfo)
    with pytest.raises(AttributeError):
        info.step = 2  # type: ignore[misc]
