"""One SwAV training step's forward and loss: scores, codes with the queue, swapped prediction.

The trainer calls `swav_step` once per iteration and then runs the backward pass and
the optimiser. The order inside matters and follows facebookresearch/swav: the queue is
scored with the current prototypes and joins Sinkhorn first, and only then receives this
batch's features, so a batch never meets its own features among the queued ones.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from swav_core.config import TrainConfig
from swav_core.loss import CollapseDiagnostics, swav_loss_and_diagnostics
from swav_core.queue import FeatureQueue


@dataclass(frozen=True)
class StepOutput:
    """The loss to back-propagate, the step's diagnostics, and whether the queue took part."""

    loss: torch.Tensor
    diagnostics: CollapseDiagnostics
    queue_in_use: bool


def swav_step(
    network: nn.Module,
    prototypes: torch.Tensor,
    crops: list[torch.Tensor],
    queue: FeatureQueue | None,
    config: TrainConfig,
    autocast: AbstractContextManager[object],
) -> StepOutput:
    """Forward all crops, score the queue, compute eq. 6, then push this batch into the queue.

    `network` maps the crops (V tensors of n images) to (z, scores), both (V*n, .);
    `prototypes` is its K x D prototype matrix, used to rescore the queue.
    """
    n = crops[0].shape[0]
    with autocast:
        z, scores = network(crops)  # (V*n, D), (V*n, K)
    queue_scores = queue.scores(prototypes) if queue is not None else None
    loss, diagnostics = swav_loss_and_diagnostics(
        scores.split(n),
        temperature=config.temperature,
        epsilon=config.epsilon,
        sinkhorn_iterations=config.sinkhorn_iterations,
        crops_for_assign=config.crops_for_assign,
        queue_scores=queue_scores,
    )
    if queue is not None:
        queue.push([z[c * n : (c + 1) * n] for c in config.crops_for_assign])
    return StepOutput(loss, diagnostics, queue_scores is not None)
