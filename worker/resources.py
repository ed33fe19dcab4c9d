"""What a training worker offers: its device, how many ranks one job may run here, the
address other nodes reach it at, and its measured training speed.

A job asks for `gpus` ranks per node (GPUs, or CPU processes on a worker without one)
and `nodes` nodes. The broker routes by size (swav_service/dispatch.py: a job of N ranks
per node goes to `train` or `train.gpusN`), and a training worker that can run R ranks
consumes the queues for 1..R. So a worker is never handed a job it cannot fit, and a job
waits in its queue until a worker that fits reads it; the database is not asked.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Any

from swav_service.settings import Settings


@dataclass(frozen=True)
class WorkerResources:
    device: str  # "cuda" or "cpu"
    gpus: int
    ranks: int  # the most ranks one job may run here: gpus, or CPU processes without one
    address: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


log = logging.getLogger(__name__)

# Measuring takes a couple of seconds (a reference training step, timed); a child process
# keeps CUDA out of the worker itself, as for training.
PROFILE_TIMEOUT_S = 120


def machine_profile() -> dict[str, Any] | None:
    """This machine's measured training throughput (swav_core.costs.Machine as a dict),
    for `preset: auto` and dry-run estimates; None if the measurement fails."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "swav_core.costs"],
            capture_output=True,
            timeout=PROFILE_TIMEOUT_S,
            check=True,
        )
        profile: dict[str, Any] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        return profile
    except (subprocess.SubprocessError, OSError, ValueError, IndexError):
        log.warning("could not measure this machine's profile", exc_info=True)
        return None


def cuda_device_count() -> int:
    """GPUs this process sees; 0 without CUDA. torch counts them through NVML when it
    can, without initialising CUDA in the worker (its training children do that)."""
    import torch

    return int(torch.cuda.device_count())


def worker_address(settings: Settings) -> str:
    return settings.worker_address or socket.gethostname()


def detect_resources(settings: Settings) -> WorkerResources:
    gpus = settings.worker_gpus if settings.worker_gpus is not None else cuda_device_count()
    if gpus > 0:
        return WorkerResources("cuda", gpus, gpus, worker_address(settings))
    cpu_ranks = settings.worker_cpu_ranks or os.cpu_count() or 1
    return WorkerResources("cpu", 0, cpu_ranks, worker_address(settings))
