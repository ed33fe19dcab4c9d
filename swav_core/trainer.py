"""The SwAV training loop: `train(config, data_dir, run_dir)`.

`_train` reads top to bottom through set-up, data, model, optimiser, resume and the
loop; the per-step math lives in the small tested modules it calls (step, sinkhorn,
loss, queue, schedule, lars), the budget fit in `budget`, collapse handling in
`collapse`, and what a checkpoint saves and restores in `training_state`. The same
entry point runs alone, under torchrun, or in processes started by `swav_core.spawn`;
rank 0 writes checkpoints and events (see `swav_core.events` for their kinds).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swav_core.backbone_families import check_crop_sizes
from swav_core.budget import BudgetFitter
from swav_core.checkpoint import CheckpointInfo, load_latest_checkpoint, save_checkpoint
from swav_core.collapse import CollapseMonitor, roll_back, window_steps
from swav_core.config import TrainConfig
from swav_core.data import ShardedEpochSampler
from swav_core.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    distributed_context,
)
from swav_core.errors import ConfigError, NonFiniteLossError
from swav_core.events import EventCallback, EventSink
from swav_core.model import SwAVModel
from swav_core.prepared import ShardFetch
from swav_core.prepared_loader import training_images, training_input
from swav_core.start_weights import load_start_weights
from swav_core.step import swav_step
from swav_core.sync_batchnorm import convert_batchnorm
from swav_core.training_state import (
    TrainingState,
    check_resumable,
    checkpoint_cost_s,
    checkpoints_per_step,
    recovered,
)

StopCallback = Callable[[], bool]

@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "stopped"]
    step: int
    total_steps: int | None  # None when a budgeted run stopped before its fit
    epoch: int
    loss: float | None
    checkpoint: CheckpointInfo | None


def autocast_context(config: TrainConfig, device: torch.device) -> Any:
    """bf16 autocast on CPU or CUDA, fp16 on CUDA only; the head and Sinkhorn stay fp32."""
    if config.precision == "fp32":
        return nullcontext()
    if config.precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision='fp16' needs a CUDA device; use 'bf16' on CPU")
    dtype = torch.bfloat16 if config.precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def freeze_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    if config.freeze_prototypes_unit == "epochs":
        return config.freeze_prototypes * steps_per_epoch
    return config.freeze_prototypes


def train(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    callbacks: Sequence[EventCallback] = (),
    should_stop: StopCallback | None = None,
    resume: bool = True,
    device: torch.device | None = None,
    started_at: float | None = None,
    prepared_dir: Path | None = None,
    fetch_shard: ShardFetch | None = None,
    start_weights: Path | None = None,
) -> TrainResult:
    """Pretrain SwAV on the images under `data_dir`, checkpointing into `run_dir`.

    With `prepared_dir` (the images' prepared copy) samples come from it, cropped in
    batches, when it can serve the run (swav_core/prepared_loader.py); otherwise from the
    images, with a "warning" event saying why. When `data_dir` is absent the copy alone
    is read, its missing shards brought by `fetch_shard` (a worker streaming them).

    A fresh run (no checkpoint to resume) starts from `start_weights` when given: a
    checkpoint, a model export or a backbone state dict (swav_core/start_weights.py); a
    resumed run keeps its checkpoint's weights.

    Resumes from the newest valid checkpoint in run_dir when `resume`. `should_stop` is
    polled after every step; when it returns True on any rank the run checkpoints and
    returns with status "stopped". A `budget_s` counts from `started_at` (a `time.time()`,
    e.g. when a worker launched this process; default: now) until a resume, which counts
    the time its checkpoint had spent. Raises `NonFiniteLossError`, `DataError`,
    `ConfigError`, `CheckpointError`, `CollapsedError` or `InvalidWeightsError` for
    failures that a retry would repeat.
    """
    since = 0.0 if started_at is None else max(0.0, time.time() - started_at)
    with distributed_context(device) as ctx:
        return _train(
            config, Path(data_dir), Path(run_dir), callbacks, should_stop, resume, ctx, since,
            prepared_dir=None if prepared_dir is None else Path(prepared_dir),
            fetch_shard=fetch_shard,
            start_weights=None if start_weights is None else Path(start_weights),
        )


def _train(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    callbacks: Sequence[EventCallback],
    should_stop: StopCallback | None,
    resume: bool,
    ctx: DistContext,
    spent_s: float = 0.0,
    prepared_dir: Path | None = None,
    fetch_shard: ShardFetch | None = None,
    start_weights: Path | None = None,
) -> TrainResult:
    # --- set-up
    started_at = time.monotonic() - spent_s  # a budget counts from here, set-up included
    device = ctx.device
    run_dir.mkdir(parents=True, exist_ok=True)
    emit = EventSink(run_dir, callbacks, ctx.is_main)
    if config.batch_size % ctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} does not split over {ctx.world_size} ranks; "
            f"use a multiple of {ctx.world_size}"
        )
    per_rank = config.batch_size // ctx.world_size
    if config.deterministic:
        torch.use_deterministic_algorithms(True)

    # --- data
    source = training_images(config, data_dir, prepared_dir, fetch_shard)
    scan = source.scan
    fingerprint = scan.fingerprint()
    sampler = ShardedEpochSampler(len(scan.files), per_rank, ctx.rank, ctx.world_size, config.seed)
    data = training_input(config, source, sampler, device)
    if source.refused:
        message = f"training decodes the images: {source.refused}"
        emit("warning", code="prepared_not_used", message=message)
    steps_per_epoch = sampler.batches_per_epoch
    emit(
        "dataset",
        num_images=len(scan.files),
        num_skipped=len(scan.skipped),
        skip_reasons=scan.skip_reasons(),
        classes=list(scan.classes) if scan.classes else None,
        fingerprint=fingerprint,
    )

    # --- model
    torch.manual_seed(config.seed)
    model = SwAVModel.from_config(config)
    check_crop_sizes(model.backbone, config.backbone, config.size_crops)
    if config.sync_bn and ctx.distributed:  # both convert the SwAVModel's children in place
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            convert_batchnorm(model)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    model.to(device)
    model.to(memory_format=memory_format)
    network: nn.Module = model
    if ctx.distributed:
        device_ids = [device.index] if device.type == "cuda" else None
        network = DistributedDataParallel(model, device_ids=device_ids)

    # --- optimiser and resume
    run = TrainingState(config, model, ctx, steps_per_epoch)
    run.started_at = started_at
    loaded = load_latest_checkpoint(run_dir, map_location="cpu") if resume else None
    if loaded is not None:
        state, resumed_from = loaded
        config = run.config = recovered(config, state)
        check_resumable(state["config"], config)
        if state["dataset_fingerprint"] != fingerprint:
            emit(
                "warning",
                code="dataset_changed",
                message="the dataset differs from the one the checkpoint was trained on",
            )
        run.load_state_dict(state)
        emit("resumed", step=run.step, epoch=run.epoch, checkpoint=str(resumed_from.path))
    elif start_weights is not None:
        loaded_what = load_start_weights(model, start_weights)
        run.initial = {k: v.clone() for k, v in model.state_dict().items()}  # a restart's too
        emit("start_weights", loaded=loaded_what)

    saved_at: dict[str, Any] = {"step": None, "info": None}

    def checkpoint(final: bool = False) -> CheckpointInfo | None:
        """Every rank joins the queue gather; rank 0 writes. One save per step at most."""
        if not final and saved_at["step"] == run.step:
            return saved_at["info"]
        state = run.state_dict(fingerprint)
        saved_at.update(step=run.step, info=None)
        if not ctx.is_main:
            return None
        info = save_checkpoint(run_dir, state, run.step, config.keep_last, final=final)
        saved_at["info"] = info
        emit(
            "checkpoint",
            step=run.step,
            epoch=run.epoch,
            path=str(info.path),
            sha256=info.sha256,
            size_bytes=info.size,
            final=final,
            loss=run.loss,
        )
        return info

    budget = None
    if config.budget_s is not None:
        budget = BudgetFitter(
            config.budget_s, run.started_at, steps_per_epoch, run.warmup_steps, run.fit
        )
    emit(
        "started",
        step=run.step,
        total_steps=run.planned_steps,
        epoch=run.epoch,
        epochs=None if run.planned_steps is None else math.ceil(run.total_steps / steps_per_epoch),
        budget_s=config.budget_s,
        steps_per_epoch=steps_per_epoch,
        world_size=ctx.world_size,
        device=str(device),
        data_path=data.data_path,
    )
    if config.checkpoint_at_start and run.step == 0:
        checkpoint()

    # --- loop
    frozen_until = freeze_steps(config, steps_per_epoch)
    autocast = autocast_context(config, device)

    def collapse_monitor() -> CollapseMonitor:
        start = max(run.warmup_steps, frozen_until, run.step)
        samples = per_rank * len(config.crops_for_assign)
        return CollapseMonitor(config.n_prototypes, samples, start, window_steps(run.total_steps))

    monitor = collapse_monitor()
    window_start, window_steps_done = time.perf_counter(), 0
    if run.batch_in_epoch >= steps_per_epoch:
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0
    while run.step < run.total_steps:
        if run.queue is None and config.queue_length > 0 and run.epoch >= config.epoch_queue_starts:
            run.queue = run.new_queue()
        sampler.set_epoch(run.epoch, start_batch=run.batch_in_epoch)
        rolled_back = False
        for crops, _ in data.loader:
            lr = run.learning_rate()
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            crops = [c.to(device, non_blocking=True) for c in crops]
            out = swav_step(network, model.prototypes.weight, crops, run.queue, config, autocast)
            run.loss = float(all_reduce_mean(out.loss.detach()))
            if not math.isfinite(run.loss):
                raise NonFiniteLossError(run.step, run.loss)

            run.optimizer.zero_grad(set_to_none=True)
            run.scaler.scale(out.loss).backward()
            prototypes_frozen = run.step < frozen_until
            if prototypes_frozen:
                model.prototypes.weight.grad = None
            run.scaler.step(run.optimizer)
            run.scaler.update()
            if not prototypes_frozen:  # frozen prototypes stay bit-identical
                model.normalize_prototypes()
            collapsed = any_rank(monitor.observe(run.step, out.diagnostics), device)
            run.step += 1
            run.batch_in_epoch += 1
            window_steps_done += 1

            if budget is not None:
                fit = budget.observe(
                    run.step,
                    time.monotonic(),
                    lambda: checkpoint_cost_s(run.state_dict(fingerprint)),
                    checkpoints_per_step(config, steps_per_epoch),
                )
                if fit is not None:
                    run.fit = fit
                    monitor = collapse_monitor()
                    emit("budget_refitted" if fit.refits else "budget_fitted", **fit.as_dict())
            if run.step % config.log_every_steps == 0 or run.step == run.total_steps:
                step_time = (time.perf_counter() - window_start) / window_steps_done
                remaining_s = (run.total_steps - run.step) * step_time
                if budget is not None and run.fit is None:
                    remaining_s = max(0.0, budget.budget_s - budget.elapsed(time.monotonic()))
                emit(
                    "metrics",
                    step=run.step,
                    total_steps=run.planned_steps,
                    epoch=run.epoch,
                    loss=run.loss,
                    lr=lr,
                    images_per_s=config.batch_size / step_time,
                    eta_s=remaining_s,
                    queue_in_use=out.queue_in_use,
                    **out.diagnostics.as_dict(),
                )
                window_start, window_steps_done = time.perf_counter(), 0
            if collapsed:
                config, frozen_until = roll_back(run, monitor, frozen_until, run_dir, emit)
                saved_at.update(step=None, info=None)
                checkpoint()  # records the rollback, so that a resume keeps it
                monitor = collapse_monitor()
                rolled_back = True
                break
            if config.checkpoint_every_steps and run.step % config.checkpoint_every_steps == 0:
                checkpoint()
            if any_rank(should_stop() if should_stop else False, device):
                saved = checkpoint()
                emit("stopped", step=run.step, total_steps=run.planned_steps, epoch=run.epoch)
                return TrainResult(
                    "stopped", run.step, run.planned_steps, run.epoch, run.loss, saved
                )
            if run.step >= run.total_steps:
                break

        if rolled_back:
            continue
        if run.batch_in_epoch >= steps_per_epoch:
            emit("epoch", epoch=run.epoch, step=run.step, loss=run.loss)
            run.epoch, run.batch_in_epoch = run.epoch + 1, 0
            every = config.checkpoint_every_epochs
            if every and run.epoch % every == 0 and run.step < run.total_steps:
                checkpoint()

    saved = checkpoint(final=True)
    emit("finished", step=run.step, total_steps=run.total_steps, loss=run.loss)
    return TrainResult("completed", run.step, run.total_steps, run.epoch, run.loss, saved)

