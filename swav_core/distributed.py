"""Process-group set-up for one entry point that runs alone, under torchrun, or spawned.

torchrun (one or many nodes) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; the
library's own `spawn` sets the same variables for N local processes. gloo on CPU, NCCL
on CUDA. Rank 0 writes checkpoints and events.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def default_device(local_rank: int = 0) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


@contextmanager
def distributed_context(device: torch.device | None = None) -> Iterator[DistContext]:
    """The rank, world and device of this process; initialises the group from env if needed.

    A group that this function created is destroyed on exit; one that the caller created
    is left alone.
    """
    created = False
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = device or default_device(local_rank)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
        created = True
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    else:
        rank, world_size, local_rank = 0, 1, 0
    try:
        yield DistContext(rank, world_size, local_rank, device or default_device(local_rank))
    finally:
        if created:
            dist.destroy_process_group()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_spawn_env(rank: int, world_size: int, port: int) -> None:
    """The variables torchrun would set, for a process spawned by `trainer.spawn`."""
    os.environ.update(
        {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
    )


def world_size() -> int:
    """Ranks of the initialised process group; 1 when this process runs alone."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world_size()
    return value


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    if world_size() == 1:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item() > 0)


def gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's `tensor` (same shape on all), in rank order; [tensor] when alone."""
    if world_size() == 1:
        return [tensor]
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out
