"""The trainer's step and its prototypes: the queue is scored before this batch joins it,
and frozen prototypes do not move by a single bit (facebookresearch/swav's order)."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from swav_core.checkpoint import list_checkpoints, load_checkpoint
from swav_core.model import SwAVModel
from swav_core.presets import config_from
from swav_core.queue import FeatureQueue
from swav_core.sinkhorn import sinkhorn
from swav_core.step import swav_step
from swav_core.trainer import train


def oracle_loss(
    scores: list[torch.Tensor], queued: list[torch.Tensor], prototypes: torch.Tensor
) -> torch.Tensor:
    """Eq. 6 with the queue's features scored by `prototypes` joining each Sinkhorn."""
    loss = torch.zeros((), dtype=torch.float64)
    for i, a in enumerate((0, 1)):
        problem = torch.cat([queued[i].double() @ prototypes.double().t(), scores[a].double()])
        q = sinkhorn(problem, 0.05, 3, dtype=torch.float64)[-scores[a].shape[0] :]
        for v in range(len(scores)):
            if v != a:
                log_p = F.log_softmax(scores[v].double() / 0.1, dim=1)
                loss -= (q * log_p).sum(dim=1).mean() / (len(scores) - 1)
    return loss / 2


def test_the_queue_is_scored_before_the_batch_is_pushed() -> None:
    config = config_from("cpu-tiny", n_prototypes=6, feat_dim=8, hidden_mlp=16, epsilon=0.05)
    torch.manual_seed(0)
    model = SwAVModel.from_config(config)
    n = 4
    crops = [torch.randn(n, 3, 32, 32) for _ in range(2)] + [
        torch.randn(n, 3, 24, 24) for _ in range(2)
    ]
    queue = FeatureQueue(2, 3 * n, config.feat_dim)
    queue.push([F.normalize(torch.randn(3 * n, config.feat_dim), dim=1) for _ in range(2)])
    before = queue.features.clone()

    out = swav_step(model, model.prototypes.weight, crops, queue, config, nullcontext())

    assert out.queue_in_use
    with torch.no_grad():
        z, scores = model(crops)
    prototypes = model.prototypes.weight.detach()
    expected = oracle_loss(list(scores.split(n)), list(before), prototypes)
    torch.testing.assert_close(out.loss.double(), expected, rtol=1e-5, atol=1e-6)
    # pushed afterwards: this batch's z of crops 0 and 1 in front, the oldest dropped
    torch.testing.assert_close(queue.features[0, :n], z[:n])
    torch.testing.assert_close(queue.features[1, :n], z[n : 2 * n])
    torch.testing.assert_close(queue.features[:, n:], before[:, : 2 * n])
    # scoring after the push would have put the batch's own features in its problem
    after_push = oracle_loss(list(scores.split(n)), list(queue.features), prototypes)
    assert abs(after_push.item() - expected.item()) > 1e-3


def prototypes_at(run_dir: Path) -> dict[int, torch.Tensor]:
    return {
        info.step: load_checkpoint(info.path)["model"]["prototypes.weight"]
        for info in list_checkpoints(run_dir)
        if not info.final and info.step is not None
    }


def test_frozen_prototypes_stay_bit_identical_in_the_trainer(
    shapes_dir: Path, tmp_path: Path
) -> None:
    """Frozen for 3 iterations: the checkpoints after steps 0..3 hold the same prototype
    bits, then the first update moves them (and they stay on the unit sphere)."""
    config = config_from(
        "cpu-tiny", epochs=2, freeze_prototypes=3, checkpoint_every_steps=1,
        checkpoint_at_start=True, keep_last=20, optimizer="lars", base_lr=0.6,
        weight_decay=1e-4,
    )
    train(config, shapes_dir, tmp_path / "run")
    saved = prototypes_at(tmp_path / "run")
    assert sorted(saved) == list(range(9))
    for step in (1, 2, 3):
        assert torch.equal(saved[step], saved[0]), step
    assert not torch.equal(saved[4], saved[0])
    torch.testing.assert_close(saved[8].norm(dim=1), torch.ones(config.n_prototypes))
