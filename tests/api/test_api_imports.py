"""The API process imports no torch at startup: it validates configs and sends tasks by
name, and loads torch only when a request needs the engine (an auto plan counts FLOPs,
an export or an embedding runs the model). import-linter cannot check this (it counts
imports inside functions too), so a fresh interpreter does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.api.helpers import wait_until
from tests.conftest import Service

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_api_loads_no_torch_and_builds_no_celery_app() -> None:
    code = (
        "import sys, api.main, swav_service.dispatch as d; "
        "print('torch' in sys.modules, d._producer is None)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert done.stdout.split() == ["False", "True"], done.stderr


def test_the_running_api_imports_the_engine_before_any_request_needs_it(
    api: Service,
) -> None:
    # `api` has answered /healthz only: torch is loaded by the warm-up, not by a request.
    maps = Path(f"/proc/{api.api.pid}/maps")
    wait_until(lambda: "libtorch_cpu" in maps.read_text(), 120, "torch in the API process")
