"""Frozen-feature evaluation: weighted kNN and a linear (logistic-regression) probe.

The two standard ways to score self-supervised features without fine-tuning: the
weighted kNN classifier of Wu et al. (2018), as used by DINO, and a linear classifier
trained on top of the frozen backbone features. `evaluate_model` runs both on a
held-out stratified split of a folder with one subfolder per class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from swav_core.embed import embed_files
from swav_core.errors import DataError
from swav_core.image_folder import scan_image_folder
from swav_core.model import SwAVModel

Labels = torch.Tensor | Sequence[int]

# Similarities computed at once in knn_top1: test rows per chunk x train rows.
_KNN_CHUNK_ELEMENTS = 1 << 24


def _as_labels(labels: Labels, n: int, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(labels, dtype=torch.long).flatten()
    if tensor.numel() != n:
        raise ValueError(f"{name} has {tensor.numel()} entries for {n} feature rows")
    if n and int(tensor.min()) < 0:
        raise ValueError(f"{name} must be class indices >= 0")
    return tensor


def _check_pair(
    train_features: torch.Tensor,
    train_labels: Labels,
    test_features: torch.Tensor,
    test_labels: Labels,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Float features, long labels, and the number of classes; ValueError when inconsistent."""
    if train_features.dim() != 2 or test_features.dim() != 2:
        raise ValueError("features must be 2-d (rows x dims)")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train features have {train_features.shape[1]} dims, test {test_features.shape[1]}"
        )
    if len(train_features) == 0 or len(test_features) == 0:
        raise ValueError("both the train and the test set need at least one row")
    y_train = _as_labels(train_labels, len(train_features), "train_labels")
    y_test = _as_labels(test_labels, len(test_features), "test_labels")
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    return train_features.float(), y_train, test_features.float(), y_test, n_classes


@torch.no_grad()
def knn_top1(
    train_features: torch.Tensor,
    train_labels: Labels,
    test_features: torch.Tensor,
    test_labels: Labels,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy in [0, 1] of the weighted kNN classifier on cosine similarity.

    Each test row votes with its k most similar train rows (k clamped to the train
    size), neighbour j weighing exp(sim_j / temperature); the class with the largest
    total weight wins (ties go to the lower class index).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    x_train, y_train, x_test, y_test, n_classes = _check_pair(
        train_features, train_labels, test_features, test_labels
    )
    x_train = F.normalize(x_train, dim=1)
    x_test = F.normalize(x_test, dim=1)
    k = min(k, len(x_train))
    chunk = max(1, _KNN_CHUNK_ELEMENTS // len(x_train))
    correct = 0
    for start in range(0, len(x_test), chunk):
        similarity = x_test[start : start + chunk] @ x_train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        votes = torch.zeros(len(top_sim), n_classes, dtype=torch.float64)
        votes.scatter_add_(1, y_train[top_idx], (top_sim.double() / temperature).exp())
        correct += int((votes.argmax(dim=1) == y_test[start : start + chunk]).sum())
    return correct / len(x_test)


def linear_probe_top1(
    train_features: torch.Tensor,
    train_labels: Labels,
    test_features: torch.Tensor,
    test_labels: Labels,
    epochs: int = 100,
    lr: float = 1.0,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> float:
    """Top-1 accuracy in [0, 1] of an L2-regularised logistic regression on the features.

    Features are standardised with the train mean and std. The probe is fitted full-batch
    with L-BFGS (strong-Wolfe line search, at most `epochs` iterations): the problem is
    convex, so this converges reliably without a learning-rate schedule, and it is
    deterministic given `seed` (which only sets the small initial weights).
    """
    if epochs < 1:
        raise ValueError(f"epochs={epochs} must be >= 1")
    x_train, y_train, x_test, y_test, n_classes = _check_pair(
        train_features, train_labels, test_features, test_labels
    )
    mean = x_train.mean(dim=0)
    std = x_train.std(dim=0, unbiased=False)
    # A dimension constant on train is left unscaled: dividing by ~0 would blow up test rows.
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    x_train = (x_train - mean) / std
    x_test = (x_test - mean) / std

    generator = torch.Generator().manual_seed(seed)
    weight = (0.01 * torch.randn(n_classes, x_train.shape[1], generator=generator)).requires_grad_()
    bias = torch.zeros(n_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=lr, max_iter=epochs, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(F.linear(x_train, weight, bias), y_train)
        loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predictions = F.linear(x_test, weight, bias).argmax(dim=1)
    return int((predictions == y_test).sum()) / len(y_test)


def stratified_split(
    labels: Labels, val_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Sorted (train, val) indices with about `val_fraction` of each class in val.

    Deterministic given `seed`. A class with at least 2 samples has at least one on
    each side; a class with a single sample goes to train.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be strictly between 0 and 1")
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    val: list[int] = []
    for label in torch.unique(y).tolist():
        members = (y == label).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=generator)].tolist()
        n_val = 0
        if len(members) >= 2:
            n_val = min(max(round(len(members) * val_fraction), 1), len(members) - 1)
        val.extend(members[:n_val])
        train.extend(members[n_val:])
    return sorted(train), sorted(val)


def evaluate_features(
    features: torch.Tensor, labels: Labels, val_fraction: float = 0.2, seed: int = 0
) -> dict[str, float]:
    """kNN and linear-probe top-1 on a stratified split: knn_top1, linear_top1, n_train, n_val.

    Raises `DataError` when the labels cannot give a meaningful split (fewer than two
    classes, or no class with two samples).
    """
    y = torch.as_tensor(labels, dtype=torch.long).flatten()
    if len(y) != len(features):
        raise ValueError(f"{len(y)} labels for {len(features)} feature rows")
    if len(torch.unique(y)) < 2:
        raise DataError("evaluation needs at least 2 classes; the labels hold fewer")
    train, val = stratified_split(y, val_fraction, seed)
    if not val:
        raise DataError(
            f"no validation images: with {len(y)} images no class has the 2 needed "
            "to put one on each side of the split"
        )
    x_train, x_val = features[train], features[val]
    return {
        "knn_top1": knn_top1(x_train, y[train], x_val, y[val]),
        "linear_top1": linear_probe_top1(x_train, y[train], x_val, y[val], seed=seed),
        "n_train": len(train),
        "n_val": len(val),
    }


def evaluate_model(
    model: SwAVModel,
    data_dir: Path,
    size: int,
    val_fraction: float = 0.2,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, float]:
    """`evaluate_features` on the model's L2-normalised backbone features of a class folder.

    Images are read as `embed_files` reads them (`batch_size` at a time, by default by a
    pixel budget), so memory holds one batch of model-sized images plus the (N x F)
    features. Raises `DataError` when `data_dir` has no class subfolders.
    """
    scan = scan_image_folder(Path(data_dir))
    if scan.labels is None:
        raise DataError(
            f"evaluation needs labels: put the images of {scan.root} in one subfolder per "
            "class (e.g. cats/1.jpg, dogs/2.jpg); some images are not in a class subfolder"
        )
    paths = [scan.root / name for name in scan.files]
    features = embed_files(model, paths, "backbone", True, size, batch_size).cpu()
    return evaluate_features(features, scan.labels, val_fraction, seed)
