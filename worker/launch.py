"""The command that runs a job's training on one node: a plain process or torch's launcher.

One rank on one node runs `python -m worker.train_child DIR` as before. More ranks run
under torch's elastic launcher (`python -m torch.distributed.run`, i.e. torchrun), which
starts the N local ranks of `worker.train_child`, sets RANK / WORLD_SIZE / LOCAL_RANK /
MASTER_ADDR for them, and ends them all if one fails:

- one node, N ranks: `--standalone` (a c10d rendezvous on a free local port);
- M nodes: `--rdzv-backend static --rdzv-endpoint HOST:PORT --node-rank R`. Node rank 0
  hosts the rendezvous store at the endpoint its worker recorded in the database, and
  the others join it. The static backend, not c10d's dynamic one, because c10d numbers
  nodes in the order of their addresses and pids, while the worker that holds node rank
  0 must be global rank 0: it writes the checkpoints and events that its worker relays.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class NodeLaunch:
    """This node's part of a job: `nproc` local ranks, node `node_rank` of `nodes`."""

    nproc: int = 1
    nodes: int = 1
    node_rank: int = 0
    endpoint: str | None = None  # host:port of node rank 0's rendezvous store (nodes > 1)
    run_id: str = "swav"  # the rendezvous id: one per job and run
    local_addr: str | None = None  # the address the other nodes reach this one at

    @property
    def single_process(self) -> bool:
        return self.nproc == 1 and self.nodes == 1


def child_command(control_dir: Path, launch: NodeLaunch = NodeLaunch()) -> list[str]:
    entry = ["-m", "worker.train_child", str(control_dir)]
    if launch.single_process:
        return [sys.executable, *entry]
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(launch.nproc),
        "--max-restarts", "0",  # a failed rank fails the run; the service decides on retries
    ]
    if launch.nodes == 1:
        command += ["--standalone", "--nnodes", "1"]
    else:
        if launch.endpoint is None:
            raise ValueError("a multi-node launch needs node rank 0's endpoint")
        command += [
            "--nnodes", str(launch.nodes),
            "--node-rank", str(launch.node_rank),
            "--rdzv-backend", "static",
            "--rdzv-endpoint", launch.endpoint,
            "--rdzv-id", launch.run_id,
        ]
        if launch.local_addr:
            command += ["--local-addr", launch.local_addr]
    return [*command, *entry]


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask Linux to send `sig` to this process when its parent dies (PR_SET_PDEATHSIG).

    torch's launcher starts each rank in a session of its own, so a kill of the launcher's
    process group does not reach them; each rank calls this so that it cannot outlive it.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, sig)
