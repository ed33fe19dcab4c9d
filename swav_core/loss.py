"""The swapped-prediction loss (Caron et al., 2020, eq. 6) and collapse diagnostics.

For each assigned crop a (crops_for_assign) the codes q_a come from Sinkhorn on that
crop's scores (with the queue's scores prepended when a queue is in use); every other
crop v predicts them with p_v = softmax(z_v^T C / tau) (eq. 2), paying the cross
entropy l(z_v, q_a) = -sum_k q_a^(k) log p_v^(k). The loss averages over the batch,
over the V - 1 predicting crops and over the assigned crops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from swav_core.sinkhorn import sinkhorn


@dataclass(frozen=True)
class CollapseDiagnostics:
    """Signals that the representation collapsed or the codes degenerated.

    code_entropy: mean entropy (nats) of the assigned crops' codes; ln K is uniform codes.
    prototype_usage: fraction of prototypes that are the argmax of the scores for at
        least one assigned sample, out of min(samples, K) that could be; near 1/K
        means every sample predicts the same prototype.
    loss_over_ln_k: loss / ln K; 1.0 is the value of constant scores (no learning).
    at_ln_k: the loss sits within 1% of ln K.
    """

    code_entropy: float
    prototype_usage: float
    loss_over_ln_k: float
    at_ln_k: bool

    def as_dict(self) -> dict[str, float | bool]:
        return {
            "code_entropy": self.code_entropy,
            "prototype_usage": self.prototype_usage,
            "loss_over_ln_k": self.loss_over_ln_k,
            "at_ln_k": self.at_ln_k,
        }


def _assigned_codes(
    scores: Sequence[torch.Tensor],
    epsilon: float,
    sinkhorn_iterations: int,
    crops_for_assign: Sequence[int],
    queue_scores: Sequence[torch.Tensor] | None,
) -> list[torch.Tensor]:
    """Codes q_a (n x K) for each assigned crop, the queue's rows dropped after Sinkhorn."""
    codes = []
    for i, crop in enumerate(crops_for_assign):
        crop_scores = scores[crop].detach()
        n = crop_scores.shape[0]
        if queue_scores is not None:
            crop_scores = torch.cat([queue_scores[i].to(crop_scores.dtype), crop_scores])
        dtype = torch.promote_types(crop_scores.dtype, torch.float32)
        codes.append(sinkhorn(crop_scores, epsilon, sinkhorn_iterations, dtype)[-n:])
    return codes


def _swapped_prediction(
    scores: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    temperature: float,
    crops_for_assign: Sequence[int],
) -> torch.Tensor:
    n_crops = len(scores)
    dtype = torch.promote_types(scores[0].dtype, torch.float32)  # fp32 at least, fp64 kept
    log_probs = [F.log_softmax(s.to(dtype) / temperature, dim=1) for s in scores]
    loss = scores[0].new_zeros((), dtype=dtype)
    for q, crop in zip(codes, crops_for_assign, strict=True):
        cross_entropy = sum(
            -(q * log_probs[v]).sum(dim=1).mean() for v in range(n_crops) if v != crop
        )
        loss = loss + cross_entropy / (n_crops - 1)
    return loss / len(crops_for_assign)


def _check_inputs(scores: Sequence[torch.Tensor], crops_for_assign: Sequence[int]) -> None:
    if len(scores) < 2:
        raise ValueError(f"need at least 2 crops' scores, got {len(scores)}")
    bad = [c for c in crops_for_assign if not 0 <= c < len(scores)]
    if bad or not crops_for_assign:
        raise ValueError(
            f"crops_for_assign={list(crops_for_assign)} invalid for {len(scores)} crops"
        )


def swav_loss(
    scores: Sequence[torch.Tensor],
    temperature: float = 0.1,
    epsilon: float = 0.05,
    sinkhorn_iterations: int = 3,
    crops_for_assign: Sequence[int] = (0, 1),
    queue_scores: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The scalar loss of eq. 6 for `scores`, one (n x K) tensor per crop.

    `queue_scores`, when given, holds one (m x K) tensor per assigned crop: the queued
    features scored with the current prototypes. They join that crop's Sinkhorn problem
    and are dropped from its codes; they receive no gradient.
    """
    loss, _ = swav_loss_and_diagnostics(
        scores, temperature, epsilon, sinkhorn_iterations, crops_for_assign, queue_scores
    )
    return loss


def swav_loss_and_diagnostics(
    scores: Sequence[torch.Tensor],
    temperature: float,
    epsilon: float,
    sinkhorn_iterations: int,
    crops_for_assign: Sequence[int],
    queue_scores: Sequence[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, CollapseDiagnostics]:
    """`swav_loss` and the `CollapseDiagnostics` of the same step, from one Sinkhorn pass.

    The hyperparameters have no defaults here: the paper's live on `swav_loss` only, and
    the training step passes its config's.
    """
    _check_inputs(scores, crops_for_assign)
    codes = _assigned_codes(scores, epsilon, sinkhorn_iterations, crops_for_assign, queue_scores)
    loss = _swapped_prediction(scores, codes, temperature, crops_for_assign)
    return loss, collapse_diagnostics(scores, codes, crops_for_assign, float(loss.detach()))


@torch.no_grad()
def collapse_diagnostics(
    scores: Sequence[torch.Tensor],
    codes: Sequence[torch.Tensor],
    crops_for_assign: Sequence[int],
    loss: float,
) -> CollapseDiagnostics:
    n_prototypes = scores[0].shape[1]
    all_codes = torch.cat([q.float() for q in codes])
    entropy = -(all_codes * all_codes.clamp_min(1e-30).log()).sum(dim=1).mean()
    predicted = torch.cat([scores[c].detach().argmax(dim=1) for c in crops_for_assign])
    possible = min(predicted.numel(), n_prototypes)
    ln_k = math.log(n_prototypes)
    return CollapseDiagnostics(
        code_entropy=float(entropy),
        prototype_usage=predicted.unique().numel() / possible,
        loss_over_ln_k=loss / ln_k,
        at_ln_k=abs(loss - ln_k) < 0.01 * ln_k,
    )
