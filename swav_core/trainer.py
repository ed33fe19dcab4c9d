"""The SwAV training loop: `train(config, data_dir, run_dir)` and `spawn` for N local ranks.

One function reads top to bottom through set-up, data, model, optimiser, resume and
the loop; the per-step math lives in the small tested modules it calls (sinkhorn,
loss, queue, schedule, lars). The same entry point runs alone, under torchrun, or in
processes started by `spawn`; rank 0 writes checkpoints and events.

Events are dicts with a "type" (started, dataset, metrics, epoch, checkpoint, warning,
stopped, finished); they go to the callbacks and, on rank 0, to run_dir/events.jsonl.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from swav_core.checkpoint import (
    CheckpointInfo,
    capture_rng_state,
    load_latest_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from swav_core.config import TrainConfig
from swav_core.data import MultiCropDataset, ShardedEpochSampler, make_loader, scan_image_folder
from swav_core.distributed import (
    DistContext,
    all_reduce_mean,
    any_rank,
    distributed_context,
    free_port,
    gather_tensors,
    set_spawn_env,
)
from swav_core.errors import ConfigError, NonFiniteLossError
from swav_core.lars import LARS, parameter_groups
from swav_core.loss import swav_loss_and_diagnostics
from swav_core.model import SwAVModel
from swav_core.multicrop import MultiCropTransform
from swav_core.queue import FeatureQueue
from swav_core.schedule import learning_rate
from swav_core.sync_batchnorm import convert_batchnorm

EventCallback = Callable[[dict[str, Any]], None]
StopCallback = Callable[[], bool]

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


@dataclass(frozen=True)
class TrainResult:
    status: Literal["completed", "stopped"]
    step: int
    total_steps: int
    epoch: int
    loss: float | None
    checkpoint: CheckpointInfo | None


class StopFile:
    """A picklable stop callback: true once `path` exists (for spawned ranks and workers)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __call__(self) -> bool:
        return self.path.exists()


class EventSink:
    """Sends events to the callbacks and appends them to events.jsonl, on rank 0 only."""

    def __init__(self, run_dir: Path, callbacks: Sequence[EventCallback], enabled: bool) -> None:
        self.path = run_dir / "events.jsonl"
        self.callbacks = callbacks
        self.enabled = enabled

    def __call__(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        event = {"type": kind, "time": time.time(), **fields}
        with self.path.open("a") as f:
            f.write(json.dumps(event) + "\n")
        for callback in self.callbacks:
            callback(event)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.lars_exclude_bias_bn)
    if config.optimizer == "lars":
        return LARS(groups, lr=config.base_lr, momentum=config.momentum, eta=config.lars_eta)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.base_lr, momentum=config.momentum)
    return torch.optim.AdamW(groups, lr=config.base_lr)


def autocast_context(config: TrainConfig, device: torch.device) -> Any:
    """bf16 autocast on CPU or CUDA, fp16 on CUDA only; Sinkhorn casts itself back to fp32."""
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


def check_resumable(saved: dict[str, Any], config: TrainConfig) -> None:
    current = config.model_dump(mode="json")
    changed = sorted(
        key for key in current if key not in RESUMABLE_CHANGES and saved.get(key) != current[key]
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


def train(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    callbacks: Sequence[EventCallback] = (),
    should_stop: StopCallback | None = None,
    resume: bool = True,
    device: torch.device | None = None,
) -> TrainResult:
    """Pretrain SwAV on the images under `data_dir`, checkpointing into `run_dir`.

    Resumes from the newest valid checkpoint in run_dir when `resume`. `should_stop` is
    polled after every step; when it returns True on any rank the run checkpoints and
    returns with status "stopped". Raises `NonFiniteLossError`, `DataError`,
    `ConfigError` or `CheckpointError` for failures that a retry would repeat.
    """
    with distributed_context(device) as ctx:
        return _train(config, Path(data_dir), Path(run_dir), callbacks, should_stop, resume, ctx)


def _train(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    callbacks: Sequence[EventCallback],
    should_stop: StopCallback | None,
    resume: bool,
    ctx: DistContext,
) -> TrainResult:
    # --- set-up
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
    autocast = autocast_context(config, device)

    # --- data
    scan = scan_image_folder(data_dir)
    dataset = MultiCropDataset(scan, MultiCropTransform.from_config(config), config.seed)
    sampler = ShardedEpochSampler(len(dataset), per_rank, ctx.rank, ctx.world_size, config.seed)
    loader = make_loader(dataset, sampler, per_rank, config.num_workers, device)
    steps_per_epoch = sampler.batches_per_epoch
    total_steps = config.epochs * steps_per_epoch
    warmup_steps = round(config.warmup_epochs * steps_per_epoch)
    emit(
        "dataset",
        num_images=len(scan.files),
        num_skipped=len(scan.skipped),
        skip_reasons=scan.skip_reasons(),
        classes=list(scan.classes) if scan.classes else None,
        fingerprint=scan.fingerprint(),
    )

    # --- model
    torch.manual_seed(config.seed)
    model = SwAVModel.from_config(config)
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

    # --- optimiser
    optimizer = build_optimizer(config, model)
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    queue: FeatureQueue | None = None
    n_assign = len(config.crops_for_assign)

    def new_queue() -> FeatureQueue:
        return FeatureQueue(
            n_assign, config.queue_length // ctx.world_size, config.feat_dim, device
        )

    # --- resume
    step, epoch, batch_in_epoch = 0, 0, 0
    last_loss: float | None = None
    if resume and (loaded := load_latest_checkpoint(run_dir, map_location="cpu")) is not None:
        state, resumed_from = loaded
        check_resumable(state["config"], config)
        if state["dataset_fingerprint"] != scan.fingerprint():
            emit(
                "warning",
                code="dataset_changed",
                message="the dataset differs from the one the checkpoint was trained on",
            )
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        last_loss = state["loss"]
        if state["queues"] is not None:
            queue = new_queue()
            queue.load_state_dict(queue_slice(state["queues"], ctx.rank, ctx.world_size))
        restore_rng_state(state["rng"])
        emit("resumed", step=step, epoch=epoch, checkpoint=str(resumed_from.path))

    saved_at: dict[str, Any] = {"step": None, "info": None}

    def checkpoint(final: bool = False) -> CheckpointInfo | None:
        """Every rank joins the queue gather; rank 0 writes. One save per step at most."""
        if not final and saved_at["step"] == step:
            return saved_at["info"]
        queues = None
        if queue is not None:
            gathered = gather_tensors(queue.features)
            queues = [{"features": f.cpu(), "filled": queue.filled} for f in gathered]
        saved_at.update(step=step, info=None)
        if not ctx.is_main:
            return None
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch_in_epoch,
            "total_steps": total_steps,
            "queues": queues,
            "rng": capture_rng_state(),
            "config": config.model_dump(mode="json"),
            "dataset_fingerprint": scan.fingerprint(),
            "world_size": ctx.world_size,
            "loss": last_loss,
        }
        info = save_checkpoint(run_dir, state, step, config.keep_last, final=final)
        saved_at["info"] = info
        emit(
            "checkpoint",
            step=step,
            epoch=epoch,
            path=str(info.path),
            sha256=info.sha256,
            size_bytes=info.size,
            final=final,
            loss=last_loss,
        )
        return info

    emit(
        "started",
        step=step,
        total_steps=total_steps,
        epoch=epoch,
        epochs=config.epochs,
        steps_per_epoch=steps_per_epoch,
        world_size=ctx.world_size,
        device=str(device),
    )

    if config.checkpoint_at_start and step == 0:
        checkpoint()

    # --- loop
    frozen_until = freeze_steps(config, steps_per_epoch)
    window_start, window_steps, step_time = time.perf_counter(), 0, 0.0
    if batch_in_epoch >= steps_per_epoch:
        epoch, batch_in_epoch = epoch + 1, 0
    while epoch < config.epochs:
        if queue is None and config.queue_length > 0 and epoch >= config.epoch_queue_starts:
            queue = new_queue()
        sampler.set_epoch(epoch, start_batch=batch_in_epoch)
        for crops, _ in loader:
            lr = learning_rate(
                step,
                total_steps,
                warmup_steps,
                config.base_lr,
                config.final_lr,
                config.start_warmup_lr,
            )
            for group in optimizer.param_groups:
                group["lr"] = lr
            model.normalize_prototypes()
            crops = [c.to(device, non_blocking=True) for c in crops]

            with autocast:
                z, scores = network(crops)  # (V*n, D), (V*n, K)
            queue_scores = queue.scores(model.prototypes.weight) if queue is not None else None
            loss, diagnostics = swav_loss_and_diagnostics(
                scores.split(per_rank),
                temperature=config.temperature,
                epsilon=config.epsilon,
                sinkhorn_iterations=config.sinkhorn_iterations,
                crops_for_assign=config.crops_for_assign,
                queue_scores=queue_scores,
            )
            last_loss = float(all_reduce_mean(loss.detach()))
            if not math.isfinite(last_loss):
                raise NonFiniteLossError(step, last_loss)
            if queue is not None:
                queue.push([z[c * per_rank : (c + 1) * per_rank] for c in config.crops_for_assign])

            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if step < frozen_until:
                model.prototypes.weight.grad = None
            scaler.step(optimizer)
            scaler.update()
            step += 1
            batch_in_epoch += 1
            window_steps += 1

            if step % config.log_every_steps == 0 or step == total_steps:
                elapsed = time.perf_counter() - window_start
                step_time = elapsed / window_steps
                emit(
                    "metrics",
                    step=step,
                    total_steps=total_steps,
                    epoch=epoch,
                    loss=last_loss,
                    lr=lr,
                    images_per_s=config.batch_size / step_time,
                    eta_s=(total_steps - step) * step_time,
                    queue_in_use=queue_scores is not None,
                    **diagnostics.as_dict(),
                )
                if diagnostics.at_ln_k and step > warmup_steps:
                    emit(
                        "warning",
                        code="suspected_collapse",
                        step=step,
                        message="the loss sits at ln K: the features may have collapsed",
                    )
                window_start, window_steps = time.perf_counter(), 0
            if config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
                checkpoint()
            if any_rank(should_stop() if should_stop else False, device):
                saved = checkpoint()
                emit("stopped", step=step, total_steps=total_steps, epoch=epoch)
                return TrainResult("stopped", step, total_steps, epoch, last_loss, saved)

        emit("epoch", epoch=epoch, step=step, loss=last_loss)
        epoch, batch_in_epoch = epoch + 1, 0
        every = config.checkpoint_every_epochs
        if every and epoch % every == 0 and epoch < config.epochs:
            checkpoint()

    saved = checkpoint(final=True)
    emit("finished", step=step, total_steps=total_steps, loss=last_loss)
    return TrainResult("completed", step, total_steps, epoch, last_loss, saved)


def _spawned_rank(
    rank: int,
    world_size: int,
    port: int,
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    should_stop: StopCallback | None,
    resume: bool,
) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent turns Ctrl-C into should_stop
    set_spawn_env(rank, world_size, port)
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    result = train(config, data_dir, run_dir, (), should_stop, resume)
    if rank == 0:
        (run_dir / "result.json").write_text(json.dumps(result.__dict__, default=str))


def spawn(
    config: TrainConfig,
    data_dir: Path,
    run_dir: Path,
    nprocs: int,
    should_stop: StopCallback | None = None,
    resume: bool = True,
) -> dict[str, Any]:
    """Run `train` in `nprocs` local processes (gloo on CPU); returns rank 0's result.

    Events are in run_dir/events.jsonl; `should_stop` must be picklable (e.g. StopFile).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").unlink(missing_ok=True)
    mp.spawn(
        _spawned_rank,
        args=(nprocs, free_port(), config, Path(data_dir), run_dir, should_stop, resume),
        nprocs=nprocs,
        join=True,
    )
    return dict(json.loads((run_dir / "result.json").read_text()))
