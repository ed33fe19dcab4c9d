"""Frozen-feature evaluation: weighted kNN against a direct oracle, linear probe, split, model."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from swav_core.errors import DataError
from swav_core.evaluate import (
    evaluate_features,
    evaluate_model,
    knn_top1,
    linear_probe_top1,
    stratified_split,
)
from swav_core.model import SwAVModel
from swav_core.synthetic import write_shapes_dataset


def clusters(
    n_per_class: int, n_classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around random unit centres; labels in order 0,0,..,1,1,.."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(n_classes, dim, generator=generator), dim=1)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    features = centres[labels] + spread * torch.randn(len(labels), dim, generator=generator)
    return features, labels


def knn_oracle(
    train: torch.Tensor, train_labels: list[int], row: list[float], k: int, temperature: float
) -> int:
    """The weighting formula written out for one test row, in plain Python floats."""
    sims = []
    for other, label in zip(train.tolist(), train_labels, strict=True):
        dot = sum(a * b for a, b in zip(row, other, strict=True))
        norms = math.sqrt(sum(a * a for a in row)) * math.sqrt(sum(b * b for b in other))
        sims.append((dot / norms, label))
    sims.sort(key=lambda pair: -pair[0])
    scores: dict[int, float] = {}
    for sim, label in sims[: min(k, len(sims))]:
        scores[label] = scores.get(label, 0.0) + math.exp(sim / temperature)
    return max(sorted(scores), key=lambda label: scores[label])


def test_knn_separable_clusters_is_perfect() -> None:
    features, labels = clusters(30, 3, 16, spread=0.05, seed=0)
    train = torch.arange(len(labels)) % 3 != 0
    accuracy = knn_top1(features[train], labels[train], features[~train], labels[~train])
    assert accuracy == 1.0


# Chance is 1/classes; the bounds sit at least 4 standard deviations of the test accuracy,
# sqrt(p (1 - p) / n_test), away from it: 0.06 >= 4 x 0.0137 for kNN (1000 rows, p = 1/4),
# 0.1 = 4 x 0.025 for the probe (400 rows, p = 1/2).
@pytest.mark.parametrize(
    ("classify", "n_train", "n_test", "n_classes", "seed", "low", "high"),
    [(knn_top1, 2000, 1000, 4, 1, 0.19, 0.31), (linear_probe_top1, 1000, 400, 2, 5, 0.4, 0.6)],
    ids=["knn", "linear_probe"],
)
def test_random_labels_score_near_chance(
    classify: Callable[..., float],
    n_train: int,
    n_test: int,
    n_classes: int,
    seed: int,
    low: float,
    high: float,
) -> None:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n_train + n_test, 32, generator=generator)
    labels = torch.randint(0, n_classes, (n_train + n_test,), generator=generator)
    accuracy = classify(features[:n_train], labels[:n_train], features[n_train:], labels[n_train:])
    assert low < accuracy < high


def test_knn_weights_close_neighbours_more_than_a_majority() -> None:
    # one class-0 neighbour nearly on the query, two class-1 neighbours at 60 degrees
    train = torch.tensor([[1.0, 0.02], [0.5, 0.866], [0.5, -0.866]])
    train_labels = [0, 1, 1]
    query = torch.tensor([[1.0, 0.0]])
    # sharp weights: exp(~1/0.07) = 1.6e6 beats 2 exp(0.5/0.07) = 2.5e3
    assert knn_top1(train, train_labels, query, [0], k=3, temperature=0.07) == 1.0
    # flat weights: exp(1/10) = 1.11 loses to 2 exp(0.05) = 2.10, the plain majority
    assert knn_top1(train, train_labels, query, [1], k=3, temperature=10.0) == 1.0
    # k = 1 keeps only the nearest
    assert knn_top1(train, train_labels, query, [0], k=1, temperature=10.0) == 1.0


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (3, 0.07), (5, 0.5), (50, 0.1)])
def test_knn_matches_direct_oracle(k: int, temperature: float) -> None:
    generator = torch.Generator().manual_seed(k)
    train = torch.randn(25, 5, generator=generator)
    test = torch.randn(15, 5, generator=generator)
    train_labels = torch.randint(0, 3, (25,), generator=generator).tolist()
    test_labels = torch.randint(0, 3, (15,), generator=generator).tolist()
    predictions = [knn_oracle(train, train_labels, row, k, temperature) for row in test.tolist()]
    for i, predicted in enumerate(predictions):  # row by row: the oracle's class scores 1
        assert knn_top1(train, train_labels, test[i : i + 1], [predicted], k, temperature) == 1.0
    expected = sum(p == t for p, t in zip(predictions, test_labels, strict=True)) / 15
    assert knn_top1(train, train_labels, test, test_labels, k, temperature) == expected


def test_knn_chunking_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    features, labels = clusters(40, 4, 8, spread=0.8, seed=3)
    args = (features[:120], labels[:120], features[120:], labels[120:])
    whole = knn_top1(*args)
    monkeypatch.setattr("swav_core.evaluate._KNN_CHUNK_ELEMENTS", 120 * 7)  # 7 rows a chunk
    assert knn_top1(*args) == whole


def test_knn_rejects_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="entries"):
        knn_top1(torch.randn(4, 3), [0, 1, 0], torch.randn(2, 3), [0, 1])
    with pytest.raises(ValueError, match="dims"):
        knn_top1(torch.randn(4, 3), [0, 1, 0, 1], torch.randn(2, 5), [0, 1])


def test_linear_probe_separates_gaussian_classes() -> None:
    generator = torch.Generator().manual_seed(4)
    n, dim = 600, 64
    labels = torch.randint(0, 3, (n,), generator=generator)
    means = 3.0 * torch.randn(3, dim, generator=generator) / math.sqrt(dim)
    features = means[labels] + torch.randn(n, dim, generator=generator) * 0.5 + 10.0
    args = (features[:400], labels[:400], features[400:], labels[400:])
    accuracy = linear_probe_top1(*args)
    assert accuracy >= 0.95
    assert linear_probe_top1(*args, seed=0) == accuracy  # deterministic


def test_linear_probe_ignores_dimensions_constant_on_train() -> None:
    features, labels = clusters(50, 2, 8, spread=0.1, seed=6)
    features = torch.cat([features, torch.zeros(len(features), 1)], dim=1)
    test = features.clone()
    test[:, -1] = 5.0  # a ReLU unit that never fired on train must not swamp the logits
    assert linear_probe_top1(features, labels, test, labels) == 1.0


def test_stratified_split_properties() -> None:
    labels = [0] * 10 + [1] * 5 + [2] * 2 + [3]
    train, val = stratified_split(labels, val_fraction=0.2, seed=0)
    assert sorted(train + val) == list(range(len(labels)))
    assert train == sorted(train) and val == sorted(val)
    assert not set(train) & set(val)
    val_counts = {c: sum(labels[i] == c for i in val) for c in range(4)}
    assert val_counts == {0: 2, 1: 1, 2: 1, 3: 0}
    assert 17 in train  # the single sample of class 3 stays in train
    assert stratified_split(labels, 0.2, seed=0) == (train, val)
    assert stratified_split(labels, 0.2, seed=1) != (train, val)
    # a large fraction still leaves one sample of every class in train
    train_big, _ = stratified_split(labels, val_fraction=0.9, seed=0)
    assert {labels[i] for i in train_big} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="val_fraction"):
        stratified_split(labels, val_fraction=1.0)


def test_evaluate_features_reports_both_accuracies() -> None:
    features, labels = clusters(20, 3, 16, spread=0.05, seed=7)
    report = evaluate_features(features, labels, val_fraction=0.25, seed=0)
    assert report == {"knn_top1": 1.0, "linear_top1": 1.0, "n_train": 45, "n_val": 15}
    with pytest.raises(DataError, match="at least 2 classes"):
        evaluate_features(features, torch.zeros(len(labels), dtype=torch.long))


def test_evaluate_model_on_class_folder(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", per_class=5, size=16)
    (data / "disk" / "broken.png").write_text("not an image")
    torch.manual_seed(0)
    model = SwAVModel("tiny_cnn", 16, 8, 10)
    report = evaluate_model(model, data, size=16, batch_size=7)
    assert set(report) == {"knn_top1", "linear_top1", "n_train", "n_val"}
    assert 0.0 <= report["knn_top1"] <= 1.0 and 0.0 <= report["linear_top1"] <= 1.0
    assert report["n_train"] + report["n_val"] == 20
    assert report["n_val"] == 4  # one of the 5 images of each of the 4 classes
    assert evaluate_model(model, data, size=16, batch_size=256) == report
    assert model.training  # embed restores the mode


def test_evaluate_model_needs_class_folders(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "flat", per_class=2, size=16, with_classes=False)
    with pytest.raises(DataError, match="one subfolder per class"):
        evaluate_model(SwAVModel("tiny_cnn", 16, 8, 10), data, size=16)
