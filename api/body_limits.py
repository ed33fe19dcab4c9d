"""Image request bodies read under byte caps (413 past them), for `POST /v1/embeddings`
and the explorer's `POST /v1/jobs/{id}/neighbours`.

The body is refused at its Content-Length when that is over the cap, else counted as it
streams in, so an oversized body is never held in memory; each uploaded image part is
read to at most one byte over its own cap.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from fastapi import Request
from starlette.datastructures import FormData, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from api.errors import ApiError
from swav_service.settings import Settings

# Multipart framing and the small form fields, on top of the images themselves.
BODY_OVERHEAD = 64 * 1024


def _payload_too_large(cap: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the request body is over {cap} bytes; send fewer or smaller images",
    )


async def capped_stream(
    request: Request,
    cap: int,
    too_large: Callable[[int], ApiError] = _payload_too_large,
    interrupted: str = "the request was interrupted",
) -> AsyncGenerator[bytes, None]:
    """The request body's chunks; `too_large(cap)` (a 413) once more than `cap` bytes are
    announced or received, 400 `client_disconnected` if the client goes away."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > cap:
        raise too_large(cap)
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > cap:
                raise too_large(cap)
            yield chunk
    except ClientDisconnect as exc:
        raise ApiError(400, "client_disconnected", interrupted) from exc


async def read_capped(upload: UploadFile, limit: int, param: str) -> bytes:
    """An uploaded image part's bytes; ApiError 413 naming `param` when over `limit`."""
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, "image_too_large", f"{param}: over the {limit}-byte limit", param)
    return data


async def parsed_form(request: Request, cap: int, max_files: int, max_fields: int) -> FormData:
    """The multipart body, read through `capped_stream(cap)`; ApiError 400
    `invalid_multipart` when it does not parse. The caller closes the form."""
    parser = MultiPartParser(
        request.headers, capped_stream(request, cap), max_files=max_files, max_fields=max_fields
    )
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(
            400, "invalid_multipart", f"the multipart body is malformed: {exc.message}"
        ) from None


async def single_image_part(request: Request, settings: Settings) -> bytes:
    """The bytes of the multipart body's one `file` part (413 over the image byte cap)."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if mime != "multipart/form-data":
        raise ApiError(
            415, "unsupported_media_type", "send multipart/form-data with the image as `file`"
        )
    limit = settings.max_image_bytes
    form = await parsed_form(request, limit + BODY_OVERHEAD, max_files=1, max_fields=0)
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(422, "invalid_request", "file: one image file part is required", "file")
        return await read_capped(upload, limit, "file")
    finally:
        await form.close()
