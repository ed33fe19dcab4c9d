"""The file layout the API and the workers share (swav_service/layout.py)."""

from __future__ import annotations

from pathlib import Path

from swav_core import checkpoint
from swav_service.layout import SIDECAR_SUFFIX, sidecar


def test_sidecar_name_is_the_engines() -> None:
    """The service repeats the engine's suffix (importing it would import torch there):
    both must name the same file, or uploads and restores would miss the sidecars."""
    assert SIDECAR_SUFFIX == checkpoint.SIDECAR_SUFFIX
    path = Path("run/checkpoints/step-000000004.pt")
    assert sidecar(path) == checkpoint.sidecar_path(path)
