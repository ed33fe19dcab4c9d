"""LARS (You et al., 2017): SGD with momentum whose per-tensor step is scaled by a trust ratio.

SwAV trains with LARS at batch 4096: facebookresearch/swav wraps SGD (momentum 0.9,
weight decay wd) in apex's LARC with clip=False and trust coefficient eta = 0.001. LARC
adapts every parameter, biases and BN weights included. For a tensor w with gradient g,
when ||w|| > 0 and ||g|| > 0:
    ratio = eta * ||w|| / (||g|| + wd * ||w|| + 1e-8),   d = (g + wd * w) * ratio,
otherwise d = g (no decay, no scaling); then SGD's momentum buf = momentum * buf + d
(buf = d at the first step) and w = w - lr * buf.
Parameter groups with `adapt=False` (biases and BN weights when `lars_exclude_bias_bn`
is set, as later LARS recipes do) take plain SGD with momentum and no weight decay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

LARC_EPS = 1e-8  # apex.parallel.LARC's eps in the ratio's denominator


class LARS(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 1e-6,
        eta: float = 0.001,
    ) -> None:
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["adapt"]:
                    d = _larc_direction(p, d, group["weight_decay"], group["eta"])
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def _larc_direction(
    p: torch.Tensor, grad: torch.Tensor, weight_decay: float, eta: float
) -> torch.Tensor:
    """(g + wd w) * eta ||w|| / (||g|| + wd ||w|| + eps), or g when either norm is zero."""
    param_norm = torch.linalg.vector_norm(p)
    grad_norm = torch.linalg.vector_norm(grad)
    ratio = eta * param_norm / (grad_norm + weight_decay * param_norm + LARC_EPS)
    adapted = grad.add(p, alpha=weight_decay) * ratio
    return torch.where((param_norm > 0) & (grad_norm > 0), adapted, grad)


def is_bias_or_norm(name: str, parameter: nn.Parameter) -> bool:
    """Biases and normalisation weights: 1-d tensors, which LARS and weight decay skip."""
    return parameter.ndim <= 1 or name.endswith(".bias")


def parameter_groups(
    model: nn.Module, weight_decay: float, exclude_bias_and_norm: bool
) -> list[dict[str, Any]]:
    """Two groups: adapted (with weight decay) and excluded (biases, norms; no decay)."""
    adapted, excluded = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if exclude_bias_and_norm and is_bias_or_norm(name, parameter):
            excluded.append(parameter)
        else:
            adapted.append(parameter)
    groups = [{"params": adapted, "weight_decay": weight_decay, "adapt": True}]
    if excluded:
        groups.append({"params": excluded, "weight_decay": 0.0, "adapt": False})
    return groups
