"""What a checkpoint saves and restores: `TrainingState` (model, optimiser, scaler, queue,
counters, the budget's fit and the collapse rollbacks), and the rules for resuming it.
"""

from __future__ import annotations

import io
import time
from typing import Any

import torch
from torch import nn

from swav_core.budget import ScheduleFit
from swav_core.config import TrainConfig
from swav_core.distributed import DistContext, gather_tensors
from swav_core.errors import ConfigError
from swav_core.lars import LARS, parameter_groups
from swav_core.model import SwAVModel
from swav_core.queue import FeatureQueue
from swav_core.rng_state import capture_rng_state, restore_rng_state
from swav_core.schedule import learning_rate

# Fields that may differ between a run and its resume: they change no computed value.
RESUMABLE_CHANGES = frozenset(
    {
        "num_workers",
        "log_every_steps",
        "checkpoint_every_steps",
        "checkpoint_every_epochs",
        "keep_last",
        "checkpoint_at_start",
    }
)
# A provisional length for a budgeted run before its fit: long enough that the cosine
# has not moved, since the measurement happens in the first percent of the run.
UNFITTED_TOTAL_STEPS = 1 << 40


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.lars_exclude_bias_bn)
    if config.optimizer == "lars":
        return LARS(groups, lr=config.base_lr, momentum=config.momentum, eta=config.lars_eta)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.base_lr)


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.model_dump(mode="json")
    changed = sorted(
        key
        for key in current
        if key not in RESUMABLE_CHANGES and saved.get(key, current[key]) != current[key]
    )
    if changed:
        raise ConfigError(
            f"cannot resume: the checkpoint was trained with other values of {', '.join(changed)}; "
            "use the same config or a new run directory"
        )


def queue_slice(saved: list[dict[str, Any]], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's queue from every rank's saved queues, re-sharded if the world size changed."""
    if len(saved) == world_size:
        return saved[rank]
    features = torch.cat([q["features"] for q in saved], dim=1)  # (A, total length, D)
    filled = sum(int(q["filled"]) for q in saved) // world_size
    return {"features": features.chunk(world_size, dim=1)[rank], "filled": filled}


def checkpoints_per_step(config: TrainConfig, steps_per_epoch: int) -> float:
    """How many checkpoints a step causes on average (for the budget's reserve)."""
    rate = 0.0
    if config.checkpoint_every_epochs:
        rate += 1 / (config.checkpoint_every_epochs * steps_per_epoch)
    if config.checkpoint_every_steps:
        rate += 1 / config.checkpoint_every_steps
    return rate


class TrainingState:
    """Model, optimiser, scaler, queue and counters: what a checkpoint saves and restores."""

    def __init__(
        self, config: TrainConfig, model: SwAVModel, ctx: DistContext, steps_per_epoch: int
    ) -> None:
        self.config = config
        self.model = model
        self.ctx = ctx
        self.steps_per_epoch = steps_per_epoch
        self.optimizer = build_optimizer(config, model)
        self.scaler = torch.amp.GradScaler(ctx.device.type, enabled=config.precision == "fp16")
        self.initial = {k: v.clone() for k, v in model.state_dict().items()}
        self.queue: FeatureQueue | None = None
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self.loss: float | None = None
        self.fit: ScheduleFit | None = None
        self.recoveries: list[dict[str, Any]] = []
        self.started_at = time.monotonic()  # moved back on resume by the time already spent

    @property
    def total_steps(self) -> int:
        if self.fit is not None:
            return self.fit.total_steps
        if self.config.budget_s is not None:
            return UNFITTED_TOTAL_STEPS
        return self.config.epochs * self.steps_per_epoch

    @property
    def planned_steps(self) -> int | None:
        """total_steps, or None while a budgeted run has not been fitted yet."""
        return None if self.total_steps == UNFITTED_TOTAL_STEPS else self.total_steps

    @property
    def warmup_steps(self) -> int:
        if self.fit is not None:
            return self.fit.warmup_steps
        return round(self.config.warmup_epochs * self.steps_per_epoch)

    def learning_rate(self) -> float:
        c = self.config
        return learning_rate(
            self.step, self.total_steps, self.warmup_steps, c.base_lr, c.final_lr, c.start_warmup_lr
        )

    def new_queue(self) -> FeatureQueue:
        c = self.config
        length = c.queue_length // self.ctx.world_size
        return FeatureQueue(len(c.crops_for_assign), length, c.feat_dim, self.ctx.device)

    def state_dict(self, dataset_fingerprint: str) -> dict[str, Any]:
        """The checkpoint; every rank joins the queue gather, so call it on every rank."""
        queues = None
        if self.queue is not None:
            gathered = gather_tensors(self.queue.features)
            queues = [{"features": f.cpu(), "filled": self.queue.filled} for f in gathered]
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "total_steps": self.planned_steps,
            "schedule_fit": self.fit.as_dict() if self.fit else None,
            "elapsed_s": time.monotonic() - self.started_at,
            "recoveries": self.recoveries,
            "queues": queues,
            "rng": capture_rng_state(),
            "config": self.config.model_dump(mode="json"),
            "dataset_fingerprint": dataset_fingerprint,
            "world_size": self.ctx.world_size,
            "loss": self.loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch, self.loss = state["batch_in_epoch"], state["loss"]
        self.fit = ScheduleFit(**state["schedule_fit"]) if state.get("schedule_fit") else None
        self.started_at = time.monotonic() - float(state.get("elapsed_s", 0.0))
        self.recoveries = list(state.get("recoveries") or [])
        self.queue = None
        if state["queues"] is not None:
            self.queue = self.new_queue()
            self.queue.load_state_dict(
                queue_slice(state["queues"], self.ctx.rank, self.ctx.world_size)
            )
        restore_rng_state(state["rng"])

    def restart_from_scratch(self, seed: int) -> None:
        """Back to the initial weights, step 0 (a rollback with no earlier checkpoint)."""
        self.model.load_state_dict(self.initial)
        self.optimizer = build_optimizer(self.config, self.model)
        self.scaler = torch.amp.GradScaler(
            self.ctx.device.type, enabled=self.config.precision == "fp16"
        )
        self.queue, self.step, self.epoch, self.batch_in_epoch, self.loss = None, 0, 0, 0, None
        torch.manual_seed(seed)


def recovered(config: TrainConfig, state: dict[str, Any]) -> TrainConfig:
    """The job's config with the rollbacks recorded in a checkpoint applied."""
    for recovery in state.get("recoveries") or []:
        config = config.with_overrides(**recovery["overrides"])
    return config


def checkpoint_cost_s(state: dict[str, Any]) -> float:
    """Seconds to serialise a checkpoint in memory, doubled for the disk write and hash."""
    start = time.perf_counter()
    torch.save(state, io.BytesIO())
    return 2 * (time.perf_counter() - start)
