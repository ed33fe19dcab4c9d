"""A per-rank queue of past features for the assignments (paper section 4.3, "small batches").

With a small batch, equal partition over B samples is a strong constraint; adding the
features of the last few batches to each Sinkhorn problem relaxes it. The queue stores
the features z (not their scores), so they are rescored with the current prototypes at
every step; they only enter the assignments, never the gradient, and only once the
queue is full, so that stale zeros never pose as features.
"""

from __future__ import annotations

from typing import Any

import torch


class FeatureQueue:
    """`length` features of dimension `dim` for each of `n_assign` assigned crops (one rank)."""

    def __init__(
        self, n_assign: int, length: int, dim: int, device: torch.device | str = "cpu"
    ) -> None:
        if length < 1:
            raise ValueError(f"queue length must be >= 1, got {length}")
        self.features = torch.zeros(n_assign, length, dim, device=device)
        self.filled = 0

    @property
    def length(self) -> int:
        return self.features.shape[1]

    @property
    def is_full(self) -> bool:
        return self.filled >= self.length

    @torch.no_grad()
    def scores(self, prototypes: torch.Tensor) -> list[torch.Tensor] | None:
        """(length x K) scores of the queued features for each assigned crop; None until full."""
        if not self.is_full:
            return None
        weight = prototypes.detach().to(self.features.dtype)
        return [queued @ weight.t() for queued in self.features]

    @torch.no_grad()
    def push(self, features: list[torch.Tensor]) -> None:
        """Put each assigned crop's batch features (n x dim) in front, dropping the oldest."""
        if len(features) != self.features.shape[0]:
            raise ValueError(
                f"push got {len(features)} feature batches, the queue holds "
                f"{self.features.shape[0]} assigned crops"
            )
        n = features[0].shape[0]
        if n < 1:
            raise ValueError("cannot push an empty batch")
        if n > self.length:
            raise ValueError(f"batch of {n} does not fit a queue of length {self.length}")
        self.features[:, n:] = self.features[:, :-n].clone()
        for i, z in enumerate(features):
            self.features[i, :n] = z.detach().to(self.features.dtype)
        self.filled = min(self.length, self.filled + n)

    def state_dict(self) -> dict[str, Any]:
        return {"features": self.features.clone(), "filled": self.filled}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        features = state["features"]
        if features.shape != self.features.shape:
            raise ValueError(
                f"queue state has shape {tuple(features.shape)}, expected "
                f"{tuple(self.features.shape)}: queue_length, feat_dim or world size changed"
            )
        self.features.copy_(features)
        self.filled = int(state["filled"])
