"""`spawn`: run `train` in N local processes (one rank each, gloo on CPU), and `StopFile`."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from swav_core.config import TrainConfig
from swav_core.distributed import free_port, set_spawn_env
from swav_core.trainer import StopCallback, train


class StopFile:
    """A picklable stop callback: true once `path` exists (for spawned ranks and workers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self) -> bool:
        return self.path.exists()


def _spawned_rank(
    rank: int,
    world_size: int,
    port: int,
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    should_stop: StopCallback | None,
    resume: bool,
    start_weights: Path | None = None,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into should_stop
    set_spawn_env(rank, world_size, port)
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    result = train(
        config, data_dir, run_dir, (), should_stop, resume, start_weights=start_weights
    )
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(result.__dict__, default=str))


def spawn(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    nprocs: int,
    should_stop: StopCallback | None = None,
    resume: bool = True,
    start_weights: Path | None = None,
) -> dict[str, Any]:
    """Run `train` in `nprocs` local processes (gloo on CPU); returns rank 0's result.

    Events are in run_dir/events.jsonl; `should_stop` must be picklable (e.g. StopFile).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    mp.spawn(
        _spawned_rank,
        args=(
            nprocs, free_port(), config, Path(data_dir), run_dir, should_stop, resume,
            start_weights,
        ),
        nprocs=nprocs,
        join=True,
    )
    return dict(json.loads((run_dir / "result.json").read_text()))
