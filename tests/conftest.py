from __future__ import annotations

from pathlib import Path

import pytest

from swav_core.synthetic import write_shapes_dataset


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 shape classes x 32 images of 32 px: 128 images, 4 steps per epoch at batch 32."""
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), per_class=32, size=32)
