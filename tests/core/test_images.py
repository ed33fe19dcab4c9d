"""`load_rgb`: every accepted mode to 8-bit RGB, the first frame of an animation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from swav_core.images import load_rgb
from tests.core.conftest import noise


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_load_rgb_gives_rgb(tmp_path: Path, mode: str) -> None:
    gray = np.asarray(noise(3).convert("L"))
    if mode == "I;16":  # full-range 16 bits, as a 16-bit grayscale PNG holds
        image = Image.fromarray(gray.astype(np.uint16) * 257)
    else:
        image = noise(3).convert(mode)
    assert image.mode == mode
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load_rgb(path)
    assert loaded.mode == "RGB" and loaded.size == (24, 24)
    if mode in ("L", "I;16"):  # 16 bits are scaled down to 8, not clipped to white
        for channel in range(3):
            assert np.array_equal(np.asarray(loaded)[..., channel], gray)


def test_load_rgb_takes_first_gif_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (8, 8), (255, 0, 0)), Image.new("RGB", (8, 8), (0, 0, 255))]
    frames[0].save(tmp_path / "a.gif", save_all=True, append_images=frames[1:])
    pixels = np.asarray(load_rgb(tmp_path / "a.gif"))
    assert tuple(pixels[0, 0]) == (255, 0, 0)
