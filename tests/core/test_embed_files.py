"""Embedding files: batches are sized by a pixel budget, not a count, and give the same
rows as embedding the decoded images in one list."""

from __future__ import annotations

from pathlib import Path

import torch

from swav_core.embed import BATCH_PIXELS, embed, embed_files, images_per_batch
from swav_core.images import load_rgb
from swav_core.model import SwAVModel
from swav_core.synthetic import write_shapes_dataset


def test_a_batch_holds_a_pixel_budget_of_model_sized_images() -> None:
    assert BATCH_PIXELS == 16_000_000
    assert images_per_batch(224) == 318  # 16e6 / 224^2 = 318.9
    assert images_per_batch(1024) == 15  # 16e6 / 1024^2 = 15.3
    assert images_per_batch(8192) == 1  # never none


def test_embed_files_matches_embed_and_forwards_batch_by_batch(tmp_path: Path) -> None:
    data = write_shapes_dataset(tmp_path / "shapes", per_class=3, size=20)
    paths = sorted(data.rglob("*.png"))
    torch.manual_seed(0)
    model = SwAVModel("tiny_cnn", 16, 8, 10)
    seen: list[int] = []
    model.backbone.register_forward_hook(lambda _, inputs, __: seen.append(len(inputs[0])))
    rows = embed_files(model, paths, "projection", False, size=16, batch_size=5)
    assert seen == [5, 5, 2]  # 12 images, 5 at a time: never more decoded together
    seen.clear()
    whole = embed(model, [load_rgb(p) for p in paths], "projection", False, size=16)
    assert seen == [12]
    torch.testing.assert_close(rows, whole)
