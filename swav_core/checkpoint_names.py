"""How a run's checkpoint files are named, without importing torch: the trainer writes
them (swav_core/checkpoint.py) and the service uploads, restores and serves them
(swav_service), so both take the names from here.

    run_dir/checkpoints/step-000001200.pt          the training state after step 1200
    run_dir/checkpoints/step-000001200.pt.sha256   its JSON sidecar: sha256, size, step
    run_dir/checkpoints/final.pt (+ .sha256)       the state at the end of training
    run_dir/checkpoints/<name>.keep                a pin: pruning keeps <name>
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.pt"
SIDECAR_SUFFIX = ".sha256"
PIN_SUFFIX = ".keep"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def sidecar_path(path: Path) -> Path:
    """A checkpoint's JSON sidecar (sha256, size, step), beside it."""
    return path.with_name(path.name + SIDECAR_SUFFIX)
