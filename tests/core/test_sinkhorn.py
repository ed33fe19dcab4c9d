"""`swav_core.sinkhorn.sinkhorn` against the paper's equations (Caron et al., 2020, eq. 3-5).

The oracle (`oracle_codes` in tests/core/conftest.py, shared with the loss tests) is
written straight from the paper's pseudo-code (appendix, Algorithm 1), in float64 and
without any max subtraction, so it shares no code and no trick with the implementation.
Golden numbers were computed by hand from the same equations.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from swav_core.sinkhorn import sinkhorn
from tests.core.conftest import oracle_codes

S0 = [[0.9, 0.1, -0.2], [0.8, 0.3, 0.0], [-0.1, 0.7, 0.2], [0.0, 0.2, 0.6]]


def oracle_per_row_max(scores: torch.Tensor, epsilon: float, iterations: int = 3) -> torch.Tensor:
    """The oracle fed with each sample's own max subtracted: NOT the same problem."""
    s = scores.to(torch.float64)
    return oracle_codes(s - s.max(dim=1, keepdim=True).values, epsilon, iterations)


def unit_scores(
    n: int, k: int, d: int, seed: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """z^T c for L2-normalised random features z (n x d) and unit prototypes c (k x d)."""
    gen = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(n, d, generator=gen, dtype=torch.float64), dim=1)
    c = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    return (z @ c.t()).to(dtype)


# --------------------------------------------------------------------------- structure


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.05, 0.3, 1.0])
def test_rows_sum_to_one_finite_nonnegative(dtype: torch.dtype, epsilon: float) -> None:
    scores = unit_scores(64, 50, 16, seed=1, dtype=dtype)
    codes = sinkhorn(scores, epsilon, 3, dtype=dtype)
    assert codes.shape == (64, 50)
    assert codes.dtype == dtype
    assert torch.isfinite(codes).all()
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(64, dtype=dtype), rtol=0, atol=1e-6)


def test_invariant_to_constant_and_per_prototype_shift() -> None:
    scores = unit_scores(40, 30, 8, seed=2, dtype=torch.float64)
    gen = torch.Generator().manual_seed(3)
    per_prototype = torch.rand(30, generator=gen, dtype=torch.float64) * 2 - 1  # shape (K,)
    base = sinkhorn(scores, 0.05, 3, dtype=torch.float64)
    shifted_const = sinkhorn(scores + 3.7, 0.05, 3, dtype=torch.float64)
    shifted_proto = sinkhorn(scores + per_prototype, 0.05, 3, dtype=torch.float64)
    torch.testing.assert_close(shifted_const, base, rtol=0, atol=1e-10)
    torch.testing.assert_close(shifted_proto, base, rtol=0, atol=1e-10)
    # fp32 too, with a looser tolerance
    base32 = sinkhorn(scores.float(), 0.05, 3)
    torch.testing.assert_close(sinkhorn(scores.float() - 0.8, 0.05, 3), base32, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        sinkhorn(scores.float() + per_prototype.float(), 0.05, 3), base32, rtol=0, atol=1e-5
    )


def test_constant_scores_give_uniform_codes_and_loss_ln_k() -> None:
    from swav_core.loss import swav_loss

    k = 3000
    scores = torch.full((16, k), 0.25, dtype=torch.float64)
    codes = sinkhorn(scores, 0.05, 3, dtype=torch.float64)
    torch.testing.assert_close(codes, torch.full_like(codes, 1 / k), rtol=0, atol=1e-15)
    loss = swav_loss([scores, scores.clone()], 0.1, 0.05, 3, (0, 1))
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(math.log(k), abs=1e-12)
    assert loss.item() == pytest.approx(8.0063676, abs=1e-7)


def test_identity_scores_diagonal() -> None:
    codes = sinkhorn(torch.eye(32, dtype=torch.float64), 0.05, 3, dtype=torch.float64)
    expected = torch.full((32,), 0.99999993610, dtype=torch.float64)
    torch.testing.assert_close(codes.diagonal(), expected, rtol=0, atol=1e-10)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="shape"):
        sinkhorn(torch.zeros(3))
    with pytest.raises(ValueError, match="iterations"):
        sinkhorn(torch.zeros(3, 4), iterations=0)
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(3, 4), epsilon=0.0)


# --------------------------------------------------------------------------- golden values


def test_golden_codes_eps_005() -> None:
    s0 = torch.tensor(S0, dtype=torch.float64)
    codes = sinkhorn(s0, 0.05, 3, dtype=torch.float64)
    row0 = torch.tensor([0.999972, 0.000028, 0.000001], dtype=torch.float64)
    row2 = torch.tensor([0.000000, 0.999662, 0.000338], dtype=torch.float64)
    torch.testing.assert_close(codes[0], row0, rtol=0, atol=5e-7)
    torch.testing.assert_close(codes[2], row2, rtol=0, atol=5e-7)
    # the oracle agrees with the same golden numbers (they are the paper's, not ours)
    torch.testing.assert_close(oracle_codes(s0, 0.05)[0], row0, rtol=0, atol=5e-7)
    torch.testing.assert_close(oracle_codes(s0, 0.05)[2], row2, rtol=0, atol=5e-7)


def test_golden_codes_eps_05() -> None:
    s0 = torch.tensor(S0, dtype=torch.float64)
    row0 = torch.tensor([0.650245, 0.202143, 0.147613], dtype=torch.float64)
    torch.testing.assert_close(
        sinkhorn(s0, 0.5, 3, dtype=torch.float64)[0], row0, rtol=0, atol=5e-7
    )
    torch.testing.assert_close(oracle_codes(s0, 0.5)[0], row0, rtol=0, atol=5e-7)


# --------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.05, 0.1, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_oracle(dtype: torch.dtype, epsilon: float, seed: int) -> None:
    scores = unit_scores(96, 70, 12, seed=seed, dtype=dtype)
    expected = oracle_codes(scores, epsilon)
    got = sinkhorn(scores, epsilon, 3, dtype=dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-12)
    # the global max is a pure shift: the oracle is invariant, and so is sinkhorn
    shifted = scores - scores.max()
    exact_shift = scores.double() - scores.double().max()  # fp32 subtraction would round
    torch.testing.assert_close(
        oracle_codes(exact_shift, epsilon), expected, rtol=1e-10, atol=1e-15
    )
    torch.testing.assert_close(
        sinkhorn(shifted, epsilon, 3, dtype=dtype).double(), expected, rtol=1e-5, atol=1e-12
    )


@pytest.mark.parametrize("iterations", [1, 2, 5])
def test_matches_oracle_other_iteration_counts(iterations: int) -> None:
    scores = unit_scores(50, 20, 8, seed=4, dtype=torch.float64)
    torch.testing.assert_close(
        sinkhorn(scores, 0.05, iterations, dtype=torch.float64),
        oracle_codes(scores, 0.05, iterations),
        rtol=1e-10,
        atol=1e-15,
    )


def test_per_row_max_changes_the_result() -> None:
    """Why a global max: a per-sample shift is not a symmetry of 3-iteration Sinkhorn."""
    s0 = torch.tensor(S0, dtype=torch.float64)
    reference = oracle_codes(s0, 0.05)
    per_row = oracle_per_row_max(s0, 0.05)
    assert (per_row - reference).abs().max() > 1e-3
    assert not torch.allclose(per_row, reference, rtol=1e-5, atol=1e-6)
    # the implementation follows the paper, not the per-row variant
    got = sinkhorn(s0, 0.05, 3, dtype=torch.float64)
    torch.testing.assert_close(got, reference, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(got, per_row, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- half precision


def _outlier_scores(dtype: torch.dtype) -> torch.Tensor:
    scores = unit_scores(256, 3000, 128, seed=5)
    scores[0] = -1.0  # a far outlier: all scores -1
    scores[1] = 1.0  # another sample at +1: the global max is 2 above the outlier
    return scores.to(dtype)


_HALF_CASES = [
    pytest.param(torch.float16, "features", id="fp16-features"),
    pytest.param(torch.bfloat16, "features", id="bf16-features"),
    pytest.param(torch.float16, "outlier", id="fp16-outlier"),
    pytest.param(torch.bfloat16, "outlier", id="bf16-outlier"),
]


@pytest.mark.parametrize("epsilon", [0.01, 0.05])
@pytest.mark.parametrize(("dtype", "case"), _HALF_CASES)
def test_half_precision_inputs(dtype: torch.dtype, case: str, epsilon: float) -> None:
    if case == "features":
        scores = unit_scores(256, 3000, 128, seed=6).to(dtype)
    else:
        scores = _outlier_scores(dtype)
    codes = sinkhorn(scores, epsilon, 3)
    assert codes.dtype == torch.float32
    assert codes.shape == (256, 3000)
    assert torch.isfinite(codes).all()
    assert (codes >= 0).all()
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(256), rtol=0, atol=1e-4)

    expected = oracle_codes(scores.to(torch.float64), epsilon)  # same (upcast) scores
    finite = torch.isfinite(expected).all(dim=1)
    assert finite.float().mean() > 0.99  # the oracle is finite here in float64
    torch.testing.assert_close(codes.double()[finite], expected[finite], rtol=1e-3, atol=1e-6)


def test_outlier_gets_a_valid_code() -> None:
    """The outlier's exp(S/eps) underflows in fp32; its code must still sum to 1."""
    scores = _outlier_scores(torch.float16)
    codes = sinkhorn(scores, 0.01, 3)
    assert codes[0].sum().item() == pytest.approx(1.0, abs=1e-4)
    assert codes[0].max() > 0


# --------------------------------------------------------------------------- autocast


def test_autocast_bf16_returns_fp32_codes_equal_to_plain() -> None:
    scores = unit_scores(128, 300, 32, seed=7)
    plain = sinkhorn(scores, 0.05, 3)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        inside = sinkhorn(scores, 0.05, 3)
    assert inside.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def test_autocast_bf16_scores_from_matmul() -> None:
    gen = torch.Generator().manual_seed(8)
    z = F.normalize(torch.randn(64, 16, generator=gen), dim=1)
    c = F.normalize(torch.randn(40, 16, generator=gen), dim=1)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        scores = z @ c.t()
        codes = sinkhorn(scores, 0.05, 3)
    assert scores.dtype == torch.bfloat16
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes, sinkhorn(scores.float(), 0.05, 3), rtol=0, atol=0)


def test_no_gradient_through_codes() -> None:
    scores = unit_scores(10, 6, 4, seed=9).requires_grad_()
    codes = sinkhorn(scores)
    assert not codes.requires_grad


# --------------------------------------------------------------------------- known limitation


def test_dead_prototype_keeps_its_share_at_small_epsilon_fp32() -> None:
    scores = torch.tensor([[1.0, 0.0, -0.9], [0.0, 1.0, -0.9]])  # prototype 2 is 1.9 below
    expected = oracle_codes(scores, 0.01)  # [[2/3, 0, 1/3], [0, 2/3, 1/3]]
    torch.testing.assert_close(
        sinkhorn(scores.double(), 0.01, 3, dtype=torch.float64), expected, rtol=0, atol=1e-6
    )  # fp64 is right
    torch.testing.assert_close(sinkhorn(scores, 0.01, 3).double(), expected, rtol=0, atol=1e-4)
