"""The training process a worker starts for one job: `python -m worker.train_child RUN_DIR`.

A separate process (own session, so the worker can kill the whole group) keeps CUDA out
of the worker and lets a stuck run be killed. It reads RUN_DIR/job.json (config and
data folder), trains with swav_core, and writes RUN_DIR/outcome.json: {"status":
"completed"|"stopped"} or {"status": "failed", "error": {"code", "message"}}. Events go
to RUN_DIR/events.jsonl, which the worker relays into the database.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from swav_core.checkpoint import atomic_write_bytes
from swav_core.config import TrainConfig
from swav_core.errors import SwavError
from swav_core.trainer import StopFile, spawn, train


def outcome_for(error: BaseException) -> dict[str, object]:
    if isinstance(error, SwavError):
        return {"status": "failed", "error": {"code": error.code, "message": str(error)}}
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return {"status": "failed", "error": {"code": "out_of_memory", "message": str(error)}}
    return {
        "status": "failed",
        "error": {"code": "internal", "message": f"{type(error).__name__}: {error}"},
    }


def main(run_dir: Path) -> int:
    spec = json.loads((run_dir / "job.json").read_text())
    config = TrainConfig.model_validate(spec["config"])
    data_dir = Path(spec["data_dir"])
    nprocs = int(spec.get("nprocs", 1))
    stop = StopFile(run_dir / "STOP")
    try:
        if nprocs > 1:
            status = spawn(config, data_dir, run_dir, nprocs, should_stop=stop)["status"]
        else:
            status = train(config, data_dir, run_dir, should_stop=stop).status
        outcome: dict[str, object] = {"status": status}
    except Exception as error:  # every failure is recorded for the worker, with its reason
        traceback.print_exc()
        outcome = outcome_for(error)
    atomic_write_bytes(run_dir / "outcome.json", json.dumps(outcome).encode())
    return 0 if outcome["status"] != "failed" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
