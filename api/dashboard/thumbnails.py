"""Thumbnails of a dataset's images for the explorer: where an image is, safely, and its PNG.

Only files inside the dataset's images folder are ever opened, and only allowed image
formats within the pixel cap are decoded (files skipped at ingestion stay in the folder).
"""

from __future__ import annotations

import io
from pathlib import Path
from urllib.parse import quote

from PIL import Image, ImageOps

from swav_core.images import ALLOWED_FORMATS
from swav_service.layout import dataset_images_dir
from swav_service.settings import Settings

THUMBNAIL_SIDE = 160


def thumbnail_url(job_id: str, path: str) -> str:
    """The thumbnail route of a dataset image (`path` relative to the dataset root)."""
    return f"/v1/jobs/{job_id}/images/{quote(path, safe='/')}"


def dataset_image_path(settings: Settings, dataset_id: str, path: str) -> Path | None:
    """`path` under the dataset's images folder, or None when it is not a file in it.

    Resolved first (`..`, absolute paths and links all end elsewhere), then required to be
    inside the folder: nothing outside it is ever opened.
    """
    root = dataset_images_dir(settings, dataset_id).resolve()
    try:
        target = (root / path).resolve()
    except (OSError, ValueError):  # a NUL byte, a loop of links
        return None
    if target == root or not target.is_relative_to(root) or not target.is_file():
        return None
    return target


def render_thumbnail(file: Path, side: int, max_pixels: int) -> bytes | None:
    """A PNG of the image, at most `side` px on its longer side; None unless the file is
    an allowed image within `max_pixels` (files skipped at ingestion stay in the folder).

    Read from the file, not into memory first: the header is checked before any pixel is
    decoded, and JPEGs are decoded at a reduced scale (`draft`).
    """
    try:
        with Image.open(file) as image:
            width, height = image.size
            if image.format not in ALLOWED_FORMATS or width * height > max_pixels:
                return None
            image.draft("RGB", (side, side))
            frame = ImageOps.exif_transpose(image)
            frame.thumbnail((side, side))
            if frame.mode not in ("RGB", "RGBA", "L", "LA"):
                frame = frame.convert("RGB")
            buffer = io.BytesIO()
            frame.save(buffer, format="PNG")
            return buffer.getvalue()
    # Truncated or malformed files fail with many exception types; all mean "not shown".
    except Exception:
        return None
