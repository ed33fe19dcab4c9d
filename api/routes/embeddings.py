"""`POST /v1/embeddings`: image embeddings from any checkpoint, as JSON or multipart.

JSON: `{"model", "input": [base64 image, ...], "layer", "normalize", "encoding_format"}`;
multipart: `files` parts with the images plus those fields as form fields. `model` is a
checkpoint id, or a job id meaning its latest available checkpoint (final, else the
highest step). The answer is `{"object": "list", "model": <checkpoint id>, "dim", "data":
[{"index", "embedding"}]}`, rows in input order. The work is in `api.embedding_service`.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.datastructures import UploadFile

from api.body_limits import BODY_OVERHEAD, capped_stream, parsed_form, read_capped
from api.deps import SettingsDep, TenantDep
from api.embedding_service import EncodingFormat, get_service
from api.errors import ApiError, validation_error
from api.limits import limit_rate
from api.openapi import BINARY, form_body
from api.responses import CHECKPOINT_GONE, RATE_LIMITED
from api.schemas.common import Layer
from swav_service.settings import Settings

router = APIRouter(tags=["embeddings"])


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        min_length=1, max_length=100, description="A checkpoint id, or a job id (its latest)."
    )
    input: list[str] = Field(
        min_length=1,
        description="Base64 images (JPEG, PNG, WEBP, BMP or GIF), or one as a string; "
        "data: URLs are accepted.",
    )
    layer: Layer = Field(
        "backbone", description="backbone: pooled features; projection: the head's output z."
    )
    normalize: bool = Field(True, description="L2-normalise each embedding.")
    encoding_format: EncodingFormat = Field(
        "float", description="float: numbers; base64: little-endian float32 bytes, base64."
    )

    @field_validator("input", mode="before")
    @classmethod
    def _one_image(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class MultipartFields(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=100)
    layer: Layer = "backbone"
    normalize: bool = True
    encoding_format: EncodingFormat = "float"


class EmbeddingPublic(BaseModel):
    index: int
    embedding: list[float] | str = Field(
        description="Numbers, or with encoding_format base64 the float32 bytes in base64."
    )


class EmbeddingsPublic(BaseModel):
    object: Literal["list"] = "list"
    model: str = Field(description="The checkpoint id that computed the embeddings.")
    dim: int
    data: list[EmbeddingPublic]


class EmbeddingStats(BaseModel):
    model_calls: int = Field(description="Forward passes since the API started.")
    forward_s: float = Field(description="Seconds spent in them.")
    items: int
    requests: int
    loads: int
    evictions: int
    overloaded: int
    queued_items: int
    cached_models: int
    cached_bytes: int
    device: str | None


EMBEDDINGS_BODY = form_body(
    {
        "model": {"type": "string"},
        "files": {"type": "array", "items": BINARY},
        "layer": {"type": "string", "enum": ["backbone", "projection"]},
        "normalize": {"type": "boolean", "default": True},
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
    },
    ["model", "files"],
    json_schema=EmbeddingRequest.model_json_schema(),
)


def body_cap(settings: Settings, base64: bool) -> int:
    per_image = settings.max_image_bytes * 4 // 3 + 4 if base64 else settings.max_image_bytes
    return settings.max_embedding_items * per_image + BODY_OVERHEAD


def _too_many(count: int, limit: int, param: str) -> ApiError:
    return ApiError(
        413,
        "too_many_inputs",
        f"{param}: {count} images; at most {limit} per request (split the request)",
        param,
    )


# Commas the fields besides `input` may hold: separators, and any in a model id.
FIELD_COMMAS = 128


async def read_json(request: Request, settings: Settings) -> tuple[MultipartFields, list[str]]:
    """The request's fields and its `input` list, counted before the list is built.

    Base64 holds no comma and a data: URL one, and a list's elements are separated by
    commas, so a body with more than two commas per allowed image (and the other fields')
    holds too many inputs: a list of a million tiny strings is refused unparsed.
    """
    body = b"".join([chunk async for chunk in capped_stream(request, body_cap(settings, True))])
    limit = settings.max_embedding_items
    if body.count(b",") > 2 * limit + FIELD_COMMAS:
        raise ApiError(
            413,
            "too_many_inputs",
            f"input: more than {limit} images; at most {limit} per request (split the request)",
            "input",
        )
    try:
        parsed = EmbeddingRequest.model_validate_json(body)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    inputs = parsed.input
    if len(inputs) > limit:
        raise _too_many(len(inputs), limit, "input")
    fields = MultipartFields.model_validate(parsed.model_dump(exclude={"input"}))
    return fields, inputs


async def read_multipart(
    request: Request, settings: Settings
) -> tuple[MultipartFields, list[bytes]]:
    # max_files: the body cap bounds them; the count is checked below
    form = await parsed_form(request, body_cap(settings, False), max_files=10_000, max_fields=20)
    try:
        values: dict[str, Any] = {}
        files: list[UploadFile] = []
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                if key != "files":
                    raise ApiError(
                        422, "invalid_request", f"{key}: images go in `files` parts", key
                    )
                files.append(value)
            elif key == "files":
                raise ApiError(422, "invalid_request", "files: must be file parts", "files")
            else:
                values[key] = value
        try:
            fields = MultipartFields.model_validate(values)
        except ValidationError as exc:
            raise validation_error(exc.errors()) from None
        if not files:
            raise ApiError(
                422, "invalid_request", "files: at least one `files` part is required", "files"
            )
        if len(files) > settings.max_embedding_items:
            raise _too_many(len(files), settings.max_embedding_items, "files")
        payloads = [
            await read_capped(file, settings.max_image_bytes, f"files.{index}")
            for index, file in enumerate(files)
        ]
        return fields, payloads
    finally:
        await form.close()


@router.post(
    "/v1/embeddings",
    response_model=EmbeddingsPublic,
    openapi_extra=EMBEDDINGS_BODY,
    responses={
        400: {"description": "An image does not decode or is not an allowed format."},
        404: {"description": "No checkpoint or job with that id (`model_not_found`)."},
        409: {"description": "The job has no checkpoint yet (`model_not_ready`)."},
        **CHECKPOINT_GONE,
        413: {"description": "Too many images, or one too large (bytes or pixels)."},
        415: {"description": "Neither JSON nor multipart/form-data."},
        **RATE_LIMITED,
        503: {"description": "The model's queue is full (`overloaded`); see Retry-After."},
    },
    dependencies=[Depends(limit_rate)],
)
async def create_embeddings(
    request: Request, settings: SettingsDep, tenant: TenantDep
) -> Response:
    """Embed up to `SWAV_MAX_EMBEDDING_ITEMS` images with a checkpoint's model (its
    preprocessing: resize and centre-crop to the checkpoint's first crop size). Concurrent
    requests for the same model and layer share forward passes (micro-batching)."""
    mime = request.headers.get("content-type", "").split(";")[0].strip().lower()
    payloads: list[str] | list[bytes]
    if mime == "multipart/form-data":
        fields, payloads = await read_multipart(request, settings)
        field_name = "files"
    elif mime in ("application/json", ""):
        fields, payloads = await read_json(request, settings)
        field_name = "input"
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            "send application/json (base64 `input`) or multipart/form-data (`files` parts)",
        )
    service = get_service(request)
    resolved = await service.resolve(tenant, fields.model)
    body = await service.embed(
        resolved, payloads, field_name, fields.layer, fields.normalize, fields.encoding_format
    )
    # Rendered in the thread pool: thousands of floats are slow to validate and to dump.
    return Response(body, media_type="application/json")


@router.get("/v1/embeddings/stats", response_model=EmbeddingStats)
async def embedding_stats(request: Request) -> EmbeddingStats:
    """Counters of this API process (forward passes, images, cache), all tenants together:
    for monitoring; any valid API key may read them."""
    return EmbeddingStats.model_validate(get_service(request).stats_dict())
