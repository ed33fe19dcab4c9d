"""Soft codes from the Sinkhorn-Knopp algorithm (Caron et al., 2020, eq. 3-5).

Eq. 3 asks for the codes Q (K x B) that maximise Tr(Q^T C^T Z) + eps H(Q) over the
transportation polytope of eq. 4 (each prototype gets B/K of the batch, each sample one
unit). Eq. 5 gives the solution as Q* = Diag(u) exp(C^T Z / eps) Diag(v); the
renormalisation vectors u, v come from a few alternating row/column normalisations.

The batch B is the GLOBAL batch: when torch.distributed is initialised, the prototype
(row) sums and the maximum are all-reduced, the sample (column) sums stay local, exactly
as if one process held every rank's samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from swav_core.distributed import world_size


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


@torch.no_grad()
def sinkhorn(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Codes (n x K, rows sum to 1) for `scores` = z^T c (n x K) by eq. 3-5.

    Computed in `dtype` (fp32, or fp64 for reference runs) whatever the autocast state or
    the input dtype, and without gradient: the codes are targets.

    Each iteration divides every prototype's mass by its global sum (all-reduced over
    ranks) and then every sample's code by its own sum; constant factors (the paper's
    1/K, 1/B and total-sum normalisation) cancel in the per-sample step, so the result
    is the paper's 3-iteration Q* up to rounding.

    Stability: exp(S / eps) overflows in fp16 and underflows in fp32 once scores differ
    by more than ~87 eps (eps = 0.01 with cosine scores). The first iteration therefore
    runs in the log domain: each prototype's log-mass is a logsumexp over the global
    batch, shifted by that prototype's maximum over all ranks (all-reduce MAX; a
    per-prototype shift is exactly what the row normalisation removes, while a per-sample
    shift would change the 3-iteration result), and each sample is normalised by its own
    logsumexp. After that step every prototype holds at least 1/K of its share and every
    sample's code sums to 1, so the remaining iterations run in linear scale, in place,
    without underflowing a whole row or column.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (n, K), got shape {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")

    with torch.autocast(device_type=scores.device.type, enabled=False):
        logits = scores.detach().to(dtype) / epsilon  # (n, K): log of exp(C^T Z / eps)^T

        prototype_max = _all_reduce(logits.max(dim=0).values, dist.ReduceOp.MAX)  # (K,)
        mass = _all_reduce(torch.exp(logits - prototype_max).sum(dim=0), dist.ReduceOp.SUM)
        logits -= mass.log() + prototype_max  # each prototype: mass 1 over the global batch
        q = torch.softmax(logits, dim=1)  # (n, K): each sample's code sums to 1

        for _ in range(iterations - 1):
            q /= _all_reduce(q.sum(dim=0), dist.ReduceOp.SUM)  # each prototype: mass 1
            q /= q.sum(dim=1, keepdim=True)  # each sample: 1
        return q
