"""`FeatureQueue`: fill/shift order, state round trip, and its role in the Sinkhorn problem."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from swav_core.loss import swav_loss
from swav_core.queue import FeatureQueue
from swav_core.sinkhorn import sinkhorn

N_ASSIGN, LENGTH, DIM, BATCH, K = 2, 12, 8, 4, 6


def features(seed: int, n: int = BATCH) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [F.normalize(torch.randn(n, DIM, generator=gen), dim=1) for _ in range(N_ASSIGN)]


def prototypes(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(K, DIM, generator=gen), dim=1)


def test_scores_none_until_full() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    assert queue.length == LENGTH
    assert queue.scores(prototypes()) is None
    for step in range(LENGTH // BATCH):
        assert not queue.is_full
        assert queue.scores(prototypes()) is None
        queue.push(features(step))
        assert queue.filled == (step + 1) * BATCH
    assert queue.is_full
    scores = queue.scores(prototypes())
    assert scores is not None
    assert len(scores) == N_ASSIGN
    for i, s in enumerate(scores):
        assert s.shape == (LENGTH, K)
        torch.testing.assert_close(s, queue.features[i] @ prototypes().t())
    queue.push(features(99))
    assert queue.filled == LENGTH  # stays capped


def test_push_puts_newest_first_and_drops_oldest() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    batches = [features(seed) for seed in range(4)]  # one more than fits
    for batch in batches:
        queue.push(batch)
    for i in range(N_ASSIGN):
        expected = torch.cat([batches[3][i], batches[2][i], batches[1][i]])
        assert torch.equal(queue.features[i], expected)  # batches[0] shifted out


def test_push_rejects_batch_larger_than_queue() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    with pytest.raises(ValueError, match="does not fit"):
        queue.push(features(0, n=LENGTH + 1))
    with pytest.raises(ValueError, match="length"):
        FeatureQueue(N_ASSIGN, 0, DIM)


def test_state_dict_round_trip() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    queue.push(features(0))
    queue.push(features(1))
    state = queue.state_dict()
    queue.push(features(2))  # the saved state is a copy, not a view
    assert state["filled"] == 2 * BATCH
    assert not torch.equal(state["features"], queue.features)

    fresh = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.features, state["features"])
    assert fresh.filled == 2 * BATCH
    assert not fresh.is_full


def test_load_state_dict_rejects_wrong_shape() -> None:
    state = FeatureQueue(N_ASSIGN, LENGTH + BATCH, DIM).state_dict()
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    with pytest.raises(ValueError, match="shape"):
        queue.load_state_dict(state)
    assert queue.filled == 0


def test_queue_position_does_not_change_batch_codes() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    for step in range(LENGTH // BATCH):
        queue.push(features(step))
    queue_scores = queue.scores(prototypes())
    assert queue_scores is not None
    batch_scores = features(50)[0] @ prototypes().t()
    before = sinkhorn(torch.cat([queue_scores[0], batch_scores]), 0.05, 3)[-BATCH:]
    after = sinkhorn(torch.cat([batch_scores, queue_scores[0]]), 0.05, 3)[:BATCH]
    torch.testing.assert_close(before, after, rtol=0, atol=1e-6)
    # and the queue does change the batch's codes (it relaxes the equipartition)
    alone = sinkhorn(batch_scores, 0.05, 3)
    assert not torch.allclose(alone, before, atol=1e-3)


def test_loss_with_queue_matches_manual_codes() -> None:
    queue = FeatureQueue(N_ASSIGN, LENGTH, DIM)
    for step in range(LENGTH // BATCH):
        queue.push(features(step))
    protos = prototypes()
    queue_scores = queue.scores(protos)
    assert queue_scores is not None
    crops = [f @ protos.t() for f in features(60)] + [f @ protos.t() for f in features(61)]
    loss = swav_loss(crops, 0.1, 0.05, 3, (0, 1), queue_scores=queue_scores)
    assert not torch.isclose(loss, swav_loss(crops, 0.1, 0.05, 3, (0, 1)), rtol=1e-4)

    expected = torch.zeros(())
    for i, a in enumerate((0, 1)):
        codes = sinkhorn(torch.cat([queue_scores[i], crops[a]]), 0.05, 3)[-BATCH:]
        cross = sum(
            -(codes * F.log_softmax(crops[v] / 0.1, dim=1)).sum(dim=1).mean()
            for v in range(len(crops))
            if v != a
        )
        expected = expected + cross / (len(crops) - 1)
    torch.testing.assert_close(loss, expected / 2, rtol=1e-6, atol=1e-6)
