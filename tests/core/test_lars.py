"""LARS against apex's LARC (clip=False) wrapped around SGD, as facebookresearch/swav runs it.

The oracle is LARC's step written out in numpy from its definition: for each parameter
with ||w|| > 0 and ||g|| > 0, ratio = eta ||w|| / (||g|| + wd ||w|| + 1e-8) and
g <- (g + wd w) ratio; otherwise g is left alone. SGD (weight decay 0, since LARC folded
it in) then keeps buf = momentum buf + g (buf = g at the first step) and w -= lr buf.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from swav_core.lars import LARS, parameter_groups
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_core.training_state import build_optimizer


def larc_sgd_oracle(
    w: np.ndarray, grads: list[np.ndarray], lr: float, wd: float, eta: float, momentum: float
) -> np.ndarray:
    w = w.astype(np.float64).copy()
    buf = None
    for g in grads:
        g = g.astype(np.float64)
        w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
        if w_norm > 0 and g_norm > 0:
            g = (g + wd * w) * (eta * w_norm / (g_norm + wd * w_norm + 1e-8))
        buf = g.copy() if buf is None else momentum * buf + g
        w = w - lr * buf
    return w


def lars_steps(
    w: np.ndarray, grads: list[np.ndarray], lr: float, wd: float, eta: float, momentum: float
) -> np.ndarray:
    p = nn.Parameter(torch.tensor(w, dtype=torch.float64))
    optimizer = LARS([p], lr=lr, momentum=momentum, weight_decay=wd, eta=eta)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        optimizer.step()
    return p.detach().numpy()


def test_golden_step_with_a_gradient_orthogonal_to_the_weights() -> None:
    # ||w|| = 5, ||g|| = 1, wd = 0.1: ratio = 0.001 * 5 / (1 + 0.5) = 1/300 and the
    # step is (g + wd w) / 300 = [1.1, -0.2] / 300. A ratio over ||g + wd w|| (= 1.118)
    # instead would give 1/223.6.
    w = lars_steps(np.array([3.0, 4.0]), [np.array([0.8, -0.6])], 1.0, 0.1, 0.001, 0.9)
    # LARC's 1e-8 in the denominator moves the step by ~1e-8 of itself (2.4e-11 here).
    np.testing.assert_allclose(w, [3.0 - 1.1 / 300, 4.0 + 0.2 / 300], rtol=0, atol=1e-10)


def test_zero_weights_take_the_plain_gradient_without_decay() -> None:
    w = lars_steps(np.zeros(3), [np.array([1.0, 2.0, -2.0])], 0.5, 0.1, 0.001, 0.9)
    np.testing.assert_allclose(w, [-0.5, -1.0, 1.0], rtol=0, atol=1e-15)


@pytest.mark.parametrize("wd", [0.0, 1e-6, 0.05])
def test_matches_larc_oracle_over_steps_with_momentum(wd: float) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 5))
    grads = [rng.normal(scale=s, size=(4, 5)) for s in (1.0, 0.1, 3.0, 0.5)]
    got = lars_steps(w, grads, 0.6, wd, 0.001, 0.9)
    np.testing.assert_allclose(got, larc_sgd_oracle(w, grads, 0.6, wd, 0.001, 0.9), rtol=1e-12)


def test_paper_preset_adapts_and_decays_every_parameter() -> None:
    """The official LARC has no exclusion: biases and BN weights are adapted and decayed."""
    config = config_from("imagenet-800ep", backbone="tiny_cnn", hidden_mlp=16, feat_dim=8,
                         n_prototypes=5)
    model = SwAVModel.from_config(config)
    optimizer = build_optimizer(config, model)
    assert isinstance(optimizer, LARS)
    assert len(optimizer.param_groups) == 1
    group = optimizer.param_groups[0]
    assert group["adapt"] and group["weight_decay"] == 1e-6 and group["eta"] == 0.001
    assert sum(p.numel() for p in group["params"]) == sum(p.numel() for p in model.parameters())


def test_exclusion_when_asked_puts_biases_and_norms_in_a_plain_group() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    adapted, excluded = parameter_groups(model, 1e-4, exclude_bias_and_norm=True)
    assert [tuple(p.shape) for p in adapted["params"]] == [(4, 3)]
    assert {tuple(p.shape) for p in excluded["params"]} == {(4,)}
    assert len(excluded["params"]) == 3  # linear bias, BN weight, BN bias
    assert excluded["weight_decay"] == 0.0 and not excluded["adapt"]
