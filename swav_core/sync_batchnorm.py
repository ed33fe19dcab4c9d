"""Batch norm over the global batch of all ranks, on any device.

torch.nn.SyncBatchNorm refuses CPU tensors, but SwAV's equivalence between N ranks and
one process with the global batch needs batch statistics over the global batch (and
gloo CPU runs are how this is tested and how CPU workers scale). This module all-reduces
per-channel sums and sums of squares with a differentiable all-reduce, so gradients
flow through the global statistics exactly as they would in a single process. On CUDA
the trainer uses torch's fused SyncBatchNorm instead.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed.nn.functional as dist_fn
from torch import nn

from swav_core.distributed import world_size


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm1d/2d whose training statistics are those of the global batch."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2-d input, got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and world_size() > 1):
            return super().forward(input)
        dims = [0, *range(2, input.dim())]
        x = input.float()
        count = torch.tensor([x.numel() / x.shape[1]], device=x.device, dtype=x.dtype)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])  # (2C + 1,)
        with warnings.catch_warnings():  # deprecated in favour of a private, non-autograd API
            warnings.simplefilter("ignore", FutureWarning)
            stats = dist_fn.all_reduce(stats)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = (stats[channels : 2 * channels] / total - mean * mean).clamp_min(0)
        running = (self.running_mean, self.running_var, self.num_batches_tracked)
        if self.track_running_stats and all(buffer is not None for buffer in running):
            with torch.no_grad():
                momentum = 0.1 if self.momentum is None else self.momentum
                unbiased = var * total / (total - 1).clamp_min(1)
                running_mean, running_var, batches = running
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)  # type: ignore[union-attr]
                running_var.lerp_(unbiased.to(running_var.dtype), momentum)  # type: ignore[union-attr]
                batches.add_(1)  # type: ignore[union-attr]
        shape = [1, channels] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm replaced by GlobalBatchNorm, weights and buffers kept."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        converted = GlobalBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight.copy_(module.weight)
                converted.bias.copy_(module.bias)
        if module.track_running_stats:
            converted.running_mean = module.running_mean
            converted.running_var = module.running_var
            converted.num_batches_tracked = module.num_batches_tracked
        return converted
    for name, child in module.named_children():
        module.add_module(name, convert_batchnorm(child))
    return module
