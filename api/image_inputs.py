"""Images sent to the embeddings endpoint: base64 or bytes, decoded within byte and pixel caps.

A request is checked whole before any pixel is decoded (`checked_payloads`: each image's
bytes, format and pixel count from its header, and the request's pixels together), then
decoded a few at a time (`decode_image`). Each failure is the API's 400 `invalid_image` or
413 `image_too_large` / `request_too_large`, naming the input (`input.3`, `files.0`) and
what to change; the pixels come out as `swav_core.images.load_rgb` reads a file, so an
uploaded image embeds as the same file in a dataset does.
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

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


def header_pixels(data: bytes, param: str, max_pixels: int) -> int:
    """The image's pixel count from its header (nothing decoded), after the same format and
    size checks as `decode_image`."""
    with _opened(data, param, max_pixels) as image:
        width, height = image.size
        return int(width * height)


def decode_image(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """`data` as 8-bit RGB exactly as `swav_core.images.load_rgb` reads a file.

    Only JPEG/PNG/WEBP/BMP/GIF (by content, not name); the first frame; EXIF orientation
    applied. Raises ApiError 400 `invalid_image` or 413 `image_too_large` (over
    `max_pixels`, checked from the header before any pixel is decoded).
    """
    with _opened(data, param, max_pixels) as image:
        try:
            return rgb_frame(image)
        # Truncated or malformed files fail with many exception types: all "undecodable".
        except Exception as exc:
            raise _invalid(param, f"cannot be decoded ({type(exc).__name__})") from None


@contextmanager
def _opened(data: bytes, param: str, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened lazily (header read, no pixels) after the format and pixel checks."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise _too_large(param, f"the image is over the {max_pixels}-pixel limit") from None
    except Image.UnidentifiedImageError:
        raise _invalid(param, "not a recognised image") from None
    except Exception as exc:
        raise _invalid(param, f"cannot be decoded ({type(exc).__name__})") from None
    with image:
        if image.format not in ALLOWED_FORMATS:
            raise _invalid(
                param, f"unsupported format {image.format}; send JPEG, PNG, WEBP, BMP or GIF"
            )
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(param, f"{width}x{height} is over the {max_pixels}-pixel limit")
        yield image


def payload_bytes(payload: str | bytes, param: str, settings: Settings) -> bytes:
    """An image's bytes: base64 text decoded, raw bytes as they are; 413 over the byte cap."""
    if isinstance(payload, str):
        return decode_base64(payload, param, settings.max_image_bytes)
    if len(payload) > settings.max_image_bytes:
        raise _too_large(
            param, f"the image is {len(payload)} bytes; the limit is {settings.max_image_bytes}"
        )
    return payload


def checked_payloads(
    payloads: Sequence[str | bytes], field_name: str, settings: Settings
) -> list[bytes]:
    """Every image's bytes, each checked from its header, and the request's pixels
    together under `max_request_pixels`, before any image is decoded; the first bad one
    raises (413 `request_too_large` for the total)."""
    data = [payload_bytes(p, f"{field_name}.{i}", settings) for i, p in enumerate(payloads)]
    total = sum(
        header_pixels(d, f"{field_name}.{i}", settings.max_image_pixels)
        for i, d in enumerate(data)
    )
    if total > settings.max_request_pixels:
        raise ApiError(
            413,
            "request_too_large",
            f"{field_name}: the images hold {total} pixels together, over the "
            f"{settings.max_request_pixels}-pixel limit of one request (setting "
            "SWAV_MAX_REQUEST_PIXELS); send fewer or smaller images per request",
            field_name,
        )
    return data


