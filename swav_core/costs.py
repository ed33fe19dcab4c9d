"""What a config costs: compute per image, memory per rank, and the machine's training speed.

Counted, not tabulated: FLOPs come from torch's FlopCounterMode and activation memory
from the tensors autograd saves, both on the meta device (no memory, no compute, any
backbone), so a new backbone needs no table entry. Time then follows from a machine's
measured training throughput (`measure_machine`), the one number that must be timed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any, Literal

import torch
from torch.utils.flop_counter import FlopCounterMode

from swav_core.config import TrainConfig
from swav_core.model import SwAVModel, create_backbone

# Backward costs about twice the forward: a training step is ~3 forward passes.
TRAIN_FLOPS_PER_FORWARD = 3.0
# Bytes per parameter held during training: weights, gradients, momentum (fp32).
BYTES_PER_PARAMETER = 12
# Activations kept in bf16/fp16 under autocast take about half the fp32 bytes.
HALF_PRECISION_ACTIVATIONS = 0.5
# The reference step of `measure_machine`: a small ResNet at 32 px, batch 64.
_PROBE_BACKBONE, _PROBE_SIZE, _PROBE_BATCH = "small_resnet10_w32", 32, 64


@dataclass(frozen=True)
class Machine:
    """One rank's device as the recipe and the estimates see it.

    `gflops` is the measured training throughput (FLOPs of forward + backward per second)
    of a reference ResNet step in `precision`; `cpu_cores` the cores for data loading and,
    on a CPU, for the step as well; `crop_ms` and `decode_ms_per_mpixel` the measured cost
    of the data path on one core.
    """

    device: Literal["cpu", "cuda"]
    gflops: float
    precision: Literal["fp32", "bf16", "fp16"]
    cpu_cores: int
    memory_gib: float | None = None
    name: str = ""
    # One core's data work: milliseconds per augmented crop (PIL, at 32-64 px) and per
    # decoded megapixel of source image.
    crop_ms: float = 0.8
    decode_ms_per_mpixel: float = 40.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class CostEstimate:
    """Seconds per epoch and in all, and peak memory per rank, for a config on a machine."""

    gflops_per_image: float
    seconds_per_epoch: float
    total_seconds: float
    peak_memory_gib: float
    machine: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=256)
def backbone_gflops(backbone: str, size: int, input_size: int) -> float:
    """Forward GFLOPs of one `size` px image through `backbone` built for `input_size`."""
    with torch.device("meta"):
        model = create_backbone(backbone, input_size).eval()  # one image: no batch statistics
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(1, 3, size, size, device="meta"))
    return counter.get_total_flops() / 1e9


def training_gflops_per_image(config: TrainConfig) -> float:
    """Forward + backward GFLOPs of one image's crops (the head and prototypes are ~free)."""
    largest = config.size_crops[0]
    forward = sum(
        count * backbone_gflops(config.backbone, size, largest)
        for count, size in zip(config.n_crops, config.size_crops, strict=True)
    )
    return TRAIN_FLOPS_PER_FORWARD * forward


@lru_cache(maxsize=256)
def _activation_bytes(config_json: str) -> tuple[int, int]:
    config = TrainConfig.model_validate_json(config_json)
    with torch.device("meta"):
        model = SwAVModel.from_config(config)
    saved: dict[int, tuple[torch.Tensor, int]] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved[id(tensor)] = (tensor, tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for count, size in zip(config.n_crops, config.size_crops, strict=True):
            model.backbone(torch.empty(count, 3, size, size, device="meta"))
    parameters = sum(p.numel() for p in model.parameters())
    return sum(n for _, n in saved.values()), parameters


def peak_memory_gib(config: TrainConfig, ranks: int) -> float:
    """Parameters, gradients and momentum plus the saved activations of a rank's batch."""
    activations, parameters = _activation_bytes(config.model_dump_json())
    if config.precision != "fp32":
        activations = int(activations * HALF_PRECISION_ACTIVATIONS)
    per_rank = max(1, config.batch_size // max(1, ranks))
    return (parameters * BYTES_PER_PARAMETER + activations * per_rank) / 2**30


def seconds_per_image(
    config: TrainConfig, machine: Machine, source_pixels: float
) -> float:
    """One rank's wall time per image: the step's compute and the data path's decode and
    crops, which overlap on a GPU machine (separate resources) and half overlap on a CPU,
    where the loader workers and the step share the cores (fitted on this project's
    2-core machine to within ~20% for three widths on MNIST and ELPV)."""
    compute = training_gflops_per_image(config) / machine.gflops
    data_ms = config.total_crops * machine.crop_ms + (
        source_pixels / 1e6 * machine.decode_ms_per_mpixel
    )
    data = data_ms / 1000 / max(1, config.num_workers)
    if machine.device == "cuda":
        return max(compute, data)
    return max(compute, data) + 0.5 * min(compute, data)


def estimate(
    config: TrainConfig,
    num_images: int,
    machine: Machine,
    ranks: int,
    source_pixels: float = 224 * 224,
) -> CostEstimate:
    """Time per epoch and in all (epochs, or the budget when set) and peak memory per rank,
    for images of `source_pixels` pixels (width x height) on average."""
    gflops = training_gflops_per_image(config)
    steps = num_images // config.batch_size
    per_epoch = steps * config.batch_size * seconds_per_image(config, machine, source_pixels)
    per_epoch /= max(1, ranks)
    total = config.budget_s if config.budget_s is not None else per_epoch * config.epochs
    return CostEstimate(
        gflops_per_image=gflops,
        seconds_per_epoch=per_epoch,
        total_seconds=total,
        peak_memory_gib=peak_memory_gib(config, ranks),
        machine=machine.name or machine.device,
    )


def cpu_supports_bf16() -> bool:
    """Whether oneDNN runs bf16 natively here (AVX512-BF16 or AMX); emulated bf16 is slower."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def measure_machine(device: torch.device | None = None, seconds: float = 1.0) -> Machine:
    """Time training steps of a reference ResNet for about `seconds` on `device`.

    The precision is the one the recipe would use there: bf16 on CUDA and on CPUs with
    native bf16, fp32 otherwise. The figure includes framework overheads, which is what
    a real step pays.
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        precision: Literal["fp32", "bf16", "fp16"] = (
            "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        )
        memory = torch.cuda.get_device_properties(device).total_memory / 2**30
        name = torch.cuda.get_device_name(device)
    else:
        precision = "bf16" if cpu_supports_bf16() else "fp32"
        memory, name = None, "cpu"
    model = create_backbone(_PROBE_BACKBONE, _PROBE_SIZE).to(device)
    model = model.to(memory_format=torch.channels_last)
    batch = torch.randn(_PROBE_BATCH, 3, _PROBE_SIZE, _PROBE_SIZE, device=device)
    batch = batch.contiguous(memory_format=torch.channels_last)
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32"):
            loss = model(batch).float().square().mean()
        loss.backward()

    step()  # warm-up: allocation, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or steps < 2:
        step()
        steps += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    crop_ms, decode_ms = _data_costs()
    flops = steps * _PROBE_BATCH * TRAIN_FLOPS_PER_FORWARD * backbone_gflops(
        _PROBE_BACKBONE, _PROBE_SIZE, _PROBE_SIZE
    )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Machine(
        device="cuda" if device.type == "cuda" else "cpu",
        gflops=round(flops / elapsed, 1),
        precision=precision,
        cpu_cores=max(1, cores or 1),
        memory_gib=None if memory is None else round(memory, 1),
        name=name,
        crop_ms=round(crop_ms, 3),
        decode_ms_per_mpixel=round(decode_ms, 2),
    )


def _data_costs(samples: int = 24) -> tuple[float, float]:
    """(ms per augmented 48 px crop, ms per decoded megapixel of PNG) on this core."""
    import io

    import numpy as np
    from PIL import Image

    from swav_core.multicrop import crop_transform

    rng = np.random.default_rng(0)
    source = Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8))
    png = io.BytesIO()
    source.save(png, "PNG")
    transform = crop_transform(48, 0.3, 1.0)
    transform(source)  # warm-up: the first call pays for lazy set-up
    start = time.perf_counter()
    for _ in range(samples):
        transform(source)
    crop_ms = 1000 * (time.perf_counter() - start) / samples
    start = time.perf_counter()
    for _ in range(samples):
        png.seek(0)
        with Image.open(png) as image:
            image.convert("RGB")
    decode_ms = 1000 * (time.perf_counter() - start) / samples / (256 * 256 / 1e6)
    return crop_ms, decode_ms


def epochs_in(seconds: float, config: TrainConfig, num_images: int, machine: Machine,
              ranks: int, source_pixels: float = 224 * 224) -> float:
    """How many epochs of `config` fit in `seconds` by the estimate (fractional)."""
    per_epoch = estimate(config, num_images, machine, ranks, source_pixels).seconds_per_epoch
    return seconds / per_epoch if per_epoch > 0 else math.inf


if __name__ == "__main__":  # `python -m swav_core.costs`: this machine's profile as JSON
    import json

    print(json.dumps(measure_machine().as_dict()))
