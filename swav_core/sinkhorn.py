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


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType) -> torch.Tensor:
    if _world_size() > 1:
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

    Stability: exp(S / eps) overflows for eps = 0.05 once S > 4.4 in fp16 and underflows
    for large gaps. The paper's Q is invariant to a global shift of S, so S is shifted by
    its GLOBAL maximum M (all-reduced). A per-sample shift would change the 3-iteration
    result, so it is only used in a form that the first column normalisation removes:
    exp((S - M)/eps) = exp((S - m_j)/eps) * exp((m_j - M)/eps) with m_j the row max of
    sample j; the second factor w_j scales sample j's column, so it enters only the first
    prototype sums and then cancels. Every column keeps an entry equal to 1, so no sample
    underflows to an all-zero code; a prototype whose mass underflows (an empty row) is
    guarded by a floor on its sum instead of dividing by zero.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be (n, K), got shape {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")

    with torch.autocast(device_type=scores.device.type, enabled=False):
        s = scores.detach().to(dtype)
        n, n_prototypes = s.shape
        global_batch = n * _world_size()
        tiny = torch.finfo(dtype).tiny

        sample_max = s.max(dim=1, keepdim=True).values  # (n, 1)
        global_max = _all_reduce(sample_max.max().clone(), dist.ReduceOp.MAX)
        q = torch.exp((s - sample_max) / epsilon).t()  # (K, n): Q of eq. 5 up to column scales
        sample_weight = torch.exp((sample_max - global_max) / epsilon).t()  # (1, n)

        for iteration in range(iterations):
            weighted = q * sample_weight if iteration == 0 else q
            row_sums = _all_reduce(weighted.sum(dim=1, keepdim=True), dist.ReduceOp.SUM)  # (K, 1)
            q = q / row_sums.clamp_min(tiny) / n_prototypes  # each prototype: mass 1/K
            q = q / q.sum(dim=0, keepdim=True).clamp_min(tiny) / global_batch  # each sample: 1/B
        return (q * global_batch).t()  # (n, K): each sample's code sums to 1
