"""The swapped-prediction loss (eq. 6): golden values, a manual oracle, and its gradient."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from swav_core.loss import swav_loss, swav_loss_and_diagnostics
from swav_core.sinkhorn import sinkhorn
from tests.core.conftest import oracle_codes

S0 = [[0.9, 0.1, -0.2], [0.8, 0.3, 0.0], [-0.1, 0.7, 0.2], [0.0, 0.2, 0.6]]
S1 = [[0.7, 0.2, 0.1], [0.6, 0.4, -0.3], [0.0, 0.8, 0.1], [0.1, 0.1, 0.9]]


def manual_loss(
    scores: list[torch.Tensor],
    temperature: float,
    epsilon: float,
    crops_for_assign: tuple[int, ...],
) -> torch.Tensor:
    """Eq. 6 written out with explicit loops, codes from the oracle."""
    n_crops = len(scores)
    total = torch.zeros((), dtype=torch.float64)
    for a in crops_for_assign:
        q = oracle_codes(scores[a], epsilon)
        sub = torch.zeros((), dtype=torch.float64)
        for v in range(n_crops):
            if v == a:
                continue
            log_p = F.log_softmax(scores[v].double() / temperature, dim=1)
            sub = sub - (q * log_p).sum(dim=1).mean()
        total = total + sub / (n_crops - 1)
    return total / len(crops_for_assign)


def random_scores(n_crops: int, n: int, k: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, k, generator=gen, dtype=torch.float64) * 0.4 for _ in range(n_crops)]


# --------------------------------------------------------------------------- golden values


@pytest.mark.parametrize(("epsilon", "expected"), [(0.05, 0.0318783), (0.5, 2.5059431)])
def test_two_crop_golden_loss(epsilon: float, expected: float) -> None:
    scores = [torch.tensor(S0, dtype=torch.float64), torch.tensor(S1, dtype=torch.float64)]
    loss = swav_loss(scores, 0.1, epsilon, 3, (0, 1))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(expected, abs=5e-7)
    assert manual_loss(scores, 0.1, epsilon, (0, 1)).item() == pytest.approx(expected, abs=5e-7)


@pytest.mark.parametrize("n_crops", [2, 8])
def test_identity_scores_golden_loss(n_crops: int) -> None:
    scores = [torch.eye(32, dtype=torch.float64) for _ in range(n_crops)]  # 2, or 2+6 crops
    loss = swav_loss(scores, 0.1, 0.05, 3, (0, 1))
    assert loss.item() == pytest.approx(0.00140705, abs=5e-9)


def test_constant_scores_loss_is_ln_k() -> None:
    k = 3000
    scores = [torch.zeros(8, k, dtype=torch.float64) + 0.3 for _ in range(4)]
    loss, diagnostics = swav_loss_and_diagnostics(scores, 0.1, 0.05, 3, (0, 1))
    assert loss.item() == pytest.approx(math.log(k), abs=1e-12)
    assert loss.item() == pytest.approx(8.0063676, abs=1e-7)
    assert diagnostics.at_ln_k
    assert diagnostics.loss_over_ln_k == pytest.approx(1.0, abs=1e-12)
    assert diagnostics.code_entropy == pytest.approx(math.log(k), rel=1e-6)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("crops_for_assign", [(0, 1), (0,), (1, 3), (0, 1, 2)])
@pytest.mark.parametrize("epsilon", [0.05, 0.3])
def test_matches_manual_oracle(crops_for_assign: tuple[int, ...], epsilon: float) -> None:
    scores = random_scores(5, 12, 9, seed=11)
    loss = swav_loss(scores, 0.1, epsilon, 3, crops_for_assign)
    expected = manual_loss(scores, 0.1, epsilon, crops_for_assign)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)


def test_fp32_and_half_scores_compute_in_fp32() -> None:
    scores64 = random_scores(4, 16, 10, seed=12)
    expected = manual_loss(scores64, 0.1, 0.05, (0, 1))
    loss32 = swav_loss([s.float() for s in scores64])
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(expected.item(), rel=1e-5)
    for half in (torch.float16, torch.bfloat16):
        half_scores = [s.to(half) for s in scores64]
        loss = swav_loss(half_scores)
        assert loss.dtype == torch.float32
        upcast = manual_loss([s.double() for s in half_scores], 0.1, 0.05, (0, 1))
        assert loss.item() == pytest.approx(upcast.item(), rel=1e-4)


def test_rejects_bad_inputs() -> None:
    scores = random_scores(2, 4, 3, seed=13)
    with pytest.raises(ValueError, match="at least 2"):
        swav_loss(scores[:1])
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav_loss(scores, crops_for_assign=(2,))
    with pytest.raises(ValueError, match="crops_for_assign"):
        swav_loss(scores, crops_for_assign=())


# --------------------------------------------------------------------------- gradient


def expected_gradient(
    scores: list[torch.Tensor], v: int, temperature: float, epsilon: float, assign: tuple[int, ...]
) -> torch.Tensor:
    """(1/|A|)(1/(V-1))(1/n) sum_{a in A, a != v} (softmax(S_v/tau) - codes_a) / tau."""
    n_crops, n = len(scores), scores[v].shape[0]
    p = torch.softmax(scores[v].detach() / temperature, dim=1)
    total = torch.zeros_like(p)
    for a in assign:
        if a != v:
            total += (p - sinkhorn(scores[a], epsilon, 3, dtype=torch.float64)) / temperature
    return total / len(assign) / (n_crops - 1) / n


@pytest.mark.parametrize("epsilon", [0.05, 0.5])
def test_gradient_matches_closed_form(epsilon: float) -> None:
    scores = [s.requires_grad_() for s in random_scores(4, 5, 7, seed=14)]  # 2+2 crops
    loss = swav_loss(scores, 0.1, epsilon, 3, (0, 1))
    grads = torch.autograd.grad(loss, scores)
    for v, grad in enumerate(grads):
        expected = expected_gradient(scores, v, 0.1, epsilon, (0, 1))
        assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-10), v
    # softmax rows and code rows both sum to 1, so every gradient row sums to zero
    for grad in grads:
        torch.testing.assert_close(grad.sum(dim=1), torch.zeros(5, dtype=torch.float64))


def test_queue_changes_loss_and_matches_manual_codes() -> None:
    scores = random_scores(3, 6, 5, seed=15)
    queue = random_scores(2, 12, 5, seed=16)
    with_queue = swav_loss(scores, 0.1, 0.05, 3, (0, 1), queue_scores=queue)
    without = swav_loss(scores, 0.1, 0.05, 3, (0, 1))
    assert not torch.isclose(with_queue, without, rtol=1e-6, atol=0)
    expected = torch.zeros((), dtype=torch.float64)
    for i, a in enumerate((0, 1)):
        q = sinkhorn(torch.cat([queue[i], scores[a]]), 0.05, 3, dtype=torch.float64)[-6:]
        for v in range(3):
            if v != a:
                log_p = F.log_softmax(scores[v] / 0.1, dim=1)
                expected -= (q * log_p).sum(dim=1).mean() / 2
    torch.testing.assert_close(with_queue, expected / 2, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- numpy oracle


def numpy_codes(scores: np.ndarray, epsilon: float, iterations: int = 3) -> np.ndarray:
    """facebookresearch/swav's distributed_sinkhorn on one process, in numpy float64."""
    q = np.exp(scores / epsilon).T  # K x B, as in the paper
    k, b = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    return (q * b).T


def numpy_log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def numpy_swav_loss(
    scores: list[np.ndarray], temperature: float, epsilon: float, crops_for_assign: tuple[int, ...]
) -> float:
    """The reference's loop: for each assigned crop, every OTHER crop predicts its codes;
    each sub-loss is divided by (total crops - 1), the sum by the number assigned."""
    n_crops = len(scores)
    loss = 0.0
    for crop_id in crops_for_assign:
        q = numpy_codes(scores[crop_id], epsilon)
        subloss = 0.0
        for v in np.delete(np.arange(n_crops), crop_id):
            subloss -= np.mean(np.sum(q * numpy_log_softmax(scores[v] / temperature), axis=1))
        loss += subloss / (n_crops - 1)
    return loss / len(crops_for_assign)


def distinct_crops(seed: int) -> list[np.ndarray]:
    """2 + 4 crops of 6 samples over 5 prototypes, every crop's scores different."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-0.6, 0.6, size=(6, 5)) for _ in range(6)]


def test_distinct_crops_match_the_reference_loop() -> None:
    scores = distinct_crops(21)
    got = swav_loss([torch.from_numpy(s) for s in scores], 0.1, 0.05, 3, (0, 1))
    assert got.item() == pytest.approx(numpy_swav_loss(scores, 0.1, 0.05, (0, 1)), rel=1e-12)


def test_distinct_crops_golden_value() -> None:
    """The value of the reference loop on fixed distinct crops (and the wrong variants that
    identical crops cannot tell apart: dividing by V, or letting a crop predict itself)."""
    scores = distinct_crops(21)
    right = numpy_swav_loss(scores, 0.1, 0.05, (0, 1))
    got = swav_loss([torch.from_numpy(s) for s in scores], 0.1, 0.05, 3, (0, 1)).item()
    assert got == pytest.approx(3.3466864, abs=5e-7)
    assert right == pytest.approx(3.3466864, abs=5e-7)
    over_v = right * 5 / 6
    with_self = 0.0
    for a in (0, 1):
        q = numpy_codes(scores[a], 0.05)
        ce = [-np.mean(np.sum(q * numpy_log_softmax(s / 0.1), axis=1)) for s in scores]
        with_self += sum(ce) / 5
    with_self /= 2
    assert abs(got - over_v) > 0.1 and abs(got - with_self) > 0.01
