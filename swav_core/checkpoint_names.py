"""How a run's checkpoint files are named, without importing torch: the trainer writes
them (swav_core/checkpoint.py) and the service uploads, restores and serves them
(swav_service), so both take the names from here.

    run_dir/checkpoints/step-000001200.pt          the training state after step 1200
    run_dir/checkpoints/step-000001200.pt.sha256   its JSON sidecar: sha256, size, step
    run_dir/checkpoints/final.pt (+ .sha256)       the state at the end of training
    run_dir/checkpoints/<name>.keep                a pin: pruning keeps <name>
    run_dir/checkpoints/step-000001200.onnx        an export made for a download (one per
                                                   format, swav_core/export_formats.py)
"""

from __future__ import annotations

from pathlib import Path

from swav_core.export_formats import EXPORT_SUFFIX

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.pt"
SIDECAR_SUFFIX = ".sha256"
PIN_SUFFIX = ".keep"


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def sidecar_path(path: Path) -> Path:
    """A checkpoint's JSON sidecar (sha256, size, step), beside it."""
    return path.with_name(path.name + SIDECAR_SUFFIX)


def export_path(checkpoint: Path, fmt: str) -> Path:
    """`step-000000008.pt` -> `step-000000008.model.safetensors` (`.onnx`, ...)."""
    return checkpoint.with_name(checkpoint.stem + EXPORT_SUFFIX[fmt])


def beside_paths(checkpoint: Path) -> list[Path]:
    """The files kept beside a checkpoint, which go with it: its sidecar and its exports."""
    return [sidecar_path(checkpoint), *(export_path(checkpoint, fmt) for fmt in EXPORT_SUFFIX)]


def checkpoint_of(beside: Path) -> Path | None:
    """The checkpoint a sidecar, pin or export belongs to by its name, else None."""
    name = beside.name
    for suffix in (SIDECAR_SUFFIX, PIN_SUFFIX):
        if name.endswith(suffix):
            return beside.with_name(name[: -len(suffix)])
    for suffix in EXPORT_SUFFIX.values():
        if name.endswith(suffix):
            return beside.with_name(name[: -len(suffix)] + ".pt")
    return None
