"""Images sent to the embeddings endpoint: base64 or bytes, decoded within byte and pixel caps.

Each failure is the API's 400 `invalid_image` or 413 `image_too_large`, naming the input
(`input[3]`, `file[0]`) and what to change; the pixels come out as
`swav_core.images.load_rgb` reads a file, so an uploaded image embeds as the same file in a
dataset does.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence

from PIL import Image

from api.errors import ApiError
from swav_core.images import ALLOWED_FORMATS, rgb_frame
from swav_service.settings import Settings


def _invalid(param: str, reason: str) -> ApiError:
    return ApiError(400, "invalid_image", f"{param}: {reason}", param)


def _too_large(param: str, reason: str) -> ApiError:
    return ApiError(413, "image_too_large", f"{param}: {reason}", param)


def decode_base64(text: str, param: str, max_bytes: int) -> bytes:
    """The bytes of a base64 image (a `data:image/...;base64,` URL is accepted too)."""
    if text.startswith("data:"):
        header, comma, text = text.partition(",")
        if not comma or not header.endswith(";base64"):
            raise _invalid(param, "a data URL must be base64 (data:image/png;base64,...)")
    text = "".join(text.split())
    if len(text) // 4 * 3 > max_bytes + 2:
        raise _too_large(param, f"the image is over the {max_bytes}-byte limit")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(param, "not valid base64") from None
    if len(data) > max_bytes:
        raise _too_large(param, f"the image is {len(data)} bytes; the limit is {max_bytes}")
    return data


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """`data` as 8-bit RGB exactly as `swav_core.images.load_rgb` reads a file.

    Only JPEG/PNG/WEBP/BMP/GIF (by content, not name); the first frame; EXIF orientation
    applied. Raises ApiError 400 `invalid_image` or 413 `image_too_large` (over
    `max_pixels`, checked from the header before any pixel is decoded).
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ALLOWED_FORMATS:
                raise _invalid(
                    param, f"unsupported format {image.format}; send JPEG, PNG, WEBP, BMP or GIF"
                )
            width, height = image.size
            if width * height > max_pixels:
                raise _too_large(
                    param, f"{width}x{height} is over the {max_pixels}-pixel limit"
                )
            return rgb_frame(image)
    except ApiError:
        raise
    except Image.DecompressionBombError:
        raise _too_large(param, f"the image is over the {max_pixels}-pixel limit") from None
    except Image.UnidentifiedImageError:
        raise _invalid(param, "not a recognised image") from None
    # Truncated or malformed files fail with many exception types; all mean "undecodable".
    except Exception as exc:
        raise _invalid(param, f"cannot be decoded ({type(exc).__name__})") from None


def decode_images(
    payloads: Sequence[str | bytes], field_name: str, settings: Settings, offset: int = 0
) -> list[Image.Image]:
    """Every payload (base64 text or raw bytes) decoded; the first bad one raises.

    `offset` is the index of `payloads[0]` in the request (for the error's `param`).
    """
    images = []
    for index, payload in enumerate(payloads, start=offset):
        param = f"{field_name}.{index}"
        if isinstance(payload, str):
            data = decode_base64(payload, param, settings.max_image_bytes)
        else:
            data = payload
            if len(data) > settings.max_image_bytes:
                raise _too_large(
                    param,
                    f"the image is {len(data)} bytes; the limit is {settings.max_image_bytes}",
                )
        images.append(decode_image(data, param, settings.max_image_pixels))
    return images
