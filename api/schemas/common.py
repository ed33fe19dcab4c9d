"""What every resource's schema shares: the row-to-model base, the error envelope, and the
service's own answers (health, readiness, the backbone list)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator

from swav_service.models import Dataset, EmbeddingJob, Job, as_utc

Layer = Literal["backbone", "projection"]  # what an embedding is read from


class PublicModel(BaseModel):
    @field_validator("*", mode="after")
    @classmethod
    def _utc_times(cls, value: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value

    @classmethod
    def from_attributes(cls, row: object, **computed: Any) -> Self:
        """The model of `row`: each field is the row's attribute of the same name, except
        those given in `computed` (renamed or derived columns). So a field added here is
        shown as soon as the row has it, and a `from_row` lists only what differs."""
        fields = {name: getattr(row, name) for name in cls.model_fields if name not in computed}
        return cls(**fields, **computed)


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="forbid")

    code: str = Field(description="Stable and machine-readable, e.g. `not_found`.")
    message: str = Field(description="What went wrong and how to fix it.")
    param: str | None = Field(description="The request field at fault (dotted), or null.")


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer (api/errors.py)."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class ErrorInfo(BaseModel):
    code: str
    message: str | None

    @classmethod
    def of(cls, row: Dataset | Job | EmbeddingJob) -> ErrorInfo | None:
        """The row's error code and message; None while it has not failed."""
        return cls(code=row.error_code, message=row.error_message) if row.error_code else None


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str
    database: str
    broker: str


class BackbonesPublic(BaseModel):
    """Backbone names for `config.backbone`: ours first, then `timm/...`, `torchvision/...`."""

    data: list[str]
    versions: dict[str, str] = Field(description="The timm and torchvision the names are of.")
