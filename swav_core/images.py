"""Reading images: the one decoding rule of the engine, the API and the workers.

Every reader (training, evaluation, embeddings over HTTP, the explorer's thumbnails) takes
the same formats and turns a file into the same pixels: the first frame, EXIF orientation
applied, 8-bit RGB. Torch-free, so the API process can use it without loading torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# MPO is how Pillow reports the multi-picture JPEGs that many cameras and phones write.
ALLOWED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF"})


def rgb_frame(image: Image.Image) -> Image.Image:
    """The first frame of an opened image as 8-bit RGB, EXIF orientation applied.

    Grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images all become RGB.
    """
    image.seek(0)
    frame = ImageOps.exif_transpose(image)
    if frame.mode.startswith("I"):
        frame = _sixteen_bit_to_l(frame)
    return frame.convert("RGB")


def load_rgb(path: Path | str) -> Image.Image:
    """The image at `path` as `rgb_frame` gives it."""
    with Image.open(path) as image:
        return rgb_frame(image)


def _sixteen_bit_to_l(image: Image.Image) -> Image.Image:
    """16-bit grayscale (as in 16-bit PNGs) scaled to 8 bits; Pillow's convert would clip.

    Mode "I" holding only 0..255 (an 8-bit image widened) is kept as it is.
    """
    pixels = np.asarray(image, dtype=np.float64)
    scale = 257.0 if image.mode != "I" or pixels.max(initial=0) > 255 else 1.0
    return Image.fromarray(np.clip(np.rint(pixels / scale), 0, 255).astype(np.uint8))
