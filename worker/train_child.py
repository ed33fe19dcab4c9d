"""The training process a worker starts for one job: `python -m worker.train_child RUN_DIR`.

A separate process (own session, so the worker can kill the whole group) keeps CUDA out
of the worker and lets a stuck run be killed. It reads RUN_DIR/job.json (config, data
folder and, when training from them, the prepared copy and the starting weights), trains
with swav_core, and writes RUN_DIR/outcome.json: {"status": "completed"|"stopped"} or
{"status": "failed", "error": {"code", "message"}}. Events go to RUN_DIR/events.jsonl,
which the worker relays into the database.

Under torch's launcher (worker/launch.py: several ranks, or several nodes) every rank runs
this module; job.json may then name the training folder (`run_dir`, shared by the nodes)
apart from the node's own folder of control files (job.json, STOP, outcome.json). Local
rank 0 writes the node's outcome, and another rank only a failure that comes first.

A child started by a worker also obeys its runner's lease heartbeat (job.json's `fence`,
worker/fence.py): once the runner stops renewing, every rank exits at once, writing
nothing, before anyone else can be given the job.
"""

from __future__ import annotations

import os

from worker.launch import die_with_parent

if "TORCHELASTIC_RUN_ID" in os.environ:  # a rank of torch's launcher: before torch loads,
    die_with_parent()  # so that a launcher killed meanwhile leaves no orphan rank

import json  # noqa: E402
import sys
import traceback
from pathlib import Path

from swav_core.atomic import atomic_write_bytes
from swav_core.config import TrainConfig
from swav_core.errors import SwavError
from swav_core.spawn import StopFile
from swav_core.trainer import train
from swav_service.prepared_copy import fetch_shard
from worker.fence import watch_heartbeat

# How gloo and NCCL report a peer rank that went away (its process or machine died): the
# run failed because another node was lost, not because of anything on this one.
PEER_LOST_MARKERS = (
    "Connection reset by peer",
    "Connection closed by peer",
    "remote process exited or there was a network error",
)


def outcome_for(error: BaseException) -> dict[str, object]:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and any(marker in str(error) for marker in PEER_LOST_MARKERS):
        return {"status": "failed", "error": {"code": "rank_lost", "message": str(error)}}
    if isinstance(error, SwavError):
        return {"status": "failed", "error": {"code": error.code, "message": str(error)}}
    if isinstance(error, MemoryError) or "out of memory" in str(error).lower():
        return {"status": "failed", "error": {"code": "out_of_memory", "message": str(error)}}
    return {
        "status": "failed",
        "error": {"code": "internal", "message": f"{type(error).__name__}: {error}"},
    }


def main(control_dir: Path) -> int:
    spec = json.loads((control_dir / "job.json").read_text())
    if "fence" in spec:  # started by a worker: stop, writing nothing, once it is fenced
        watch_heartbeat(Path(spec["fence"]["heartbeat"]), float(spec["fence"]["every_s"]))
    config = TrainConfig.model_validate(spec["config"])
    data_dir = Path(spec["data_dir"])
    run_dir = Path(spec.get("run_dir", control_dir))
    stop = StopFile(control_dir / "STOP")
    try:
        status = train(
            config,
            data_dir,
            run_dir,
            should_stop=stop,
            started_at=spec.get("launched_at"),
            prepared_dir=Path(spec["prepared_dir"]) if "prepared_dir" in spec else None,
            fetch_shard=fetch_shard if spec.get("stream_prepared") else None,
            start_weights=Path(spec["start_weights"]) if "start_weights" in spec else None,
        ).status
        outcome: dict[str, object] = {"status": status}
    except Exception as error:  # every failure is recorded for the worker, with its reason
        traceback.print_exc()
        outcome = outcome_for(error)
    failed = outcome["status"] == "failed"
    path = control_dir / "outcome.json"
    node_main = os.environ.get("LOCAL_RANK", "0") == "0"
    first_failure = failed and not path.exists()  # later ones mostly echo it (peer gone)
    if first_failure or (node_main and not failed):
        atomic_write_bytes(path, json.dumps(outcome).encode())
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
