"""Helpers and fixtures shared by the engine's tests (tests/core)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# --------------------------------------------------------------------------- image folders


def noise(seed: int, size: int = 24) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def jpeg_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    noise(seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture
def class_dir(tmp_path: Path) -> Path:
    """cats/ and dogs/ with 6 valid images each of several kinds, plus 3 broken files."""
    root = tmp_path / "data"
    for name in ("dogs", "cats"):
        (root / name).mkdir(parents=True)
    for i in range(3):
        noise(i).save(root / "cats" / f"c{i}.png")
        noise(10 + i).save(root / "dogs" / f"d{i}.jpg", quality=90)
    noise(3).save(root / "cats" / "c3.jpg")
    noise(4).convert("L").save(root / "cats" / "gray.png")
    noise(5).convert("P").save(root / "cats" / "palette.png")
    frames = [noise(20), noise(21)]
    frames[0].save(root / "dogs" / "anim.gif", save_all=True, append_images=frames[1:])
    noise(22).save(root / "dogs" / "d3.webp")
    noise(23).save(root / "dogs" / "d4.bmp")
    # a PNG saved under a .jpg name is still a valid image: the decoded format decides
    noise(24).save(root / "dogs" / "misnamed.jpg", format="PNG")

    data = jpeg_bytes(30)
    (root / "dogs" / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "cats" / "notes.png").write_text("this is not a picture\n")
    (root / "cats" / "empty.jpg").write_bytes(b"")
    noise(40).save(root / "cats" / "scan.tiff")
    (root / "cats" / ".hidden.png").write_bytes(b"junk")
    (root / ".cache").mkdir()
    noise(41).save(root / ".cache" / "thumb.png")
    return root


# --------------------------------------------------------------------------- Sinkhorn oracle


def oracle_codes(scores: torch.Tensor, epsilon: float, iterations: int = 3) -> torch.Tensor:
    """Codes (n x K) by the paper's Sinkhorn-Knopp (eq. 3-5; appendix, Algorithm 1), in
    float64 and without any max subtraction, so it shares no code and no trick with
    swav_core.sinkhorn. The oracle of test_sinkhorn and of the loss tests."""
    q = torch.exp(scores.detach().to(torch.float64).t() / epsilon)  # (K, B)
    n_prototypes, batch = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(dim=1, keepdim=True) / n_prototypes
        q = q / q.sum(dim=0, keepdim=True) / batch
    return (q * batch).t()


# --------------------------------------------------------------------------- registries


def assert_unknown_name_lists_known(lookup: Callable[[str], object], known: Iterable[str]) -> None:
    """`lookup("nope")` raises KeyError whose message quotes the name and lists every known
    one, so a typo in a preset or backbone name tells the user what to write instead."""
    with pytest.raises(KeyError) as excinfo:
        lookup("nope")
    message = excinfo.value.args[0]
    assert "'nope'" in message
    for name in known:
        assert name in message
