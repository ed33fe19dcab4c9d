"""The tenant's stored bytes, part by part, as the stored-bytes limit counts them."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import SessionDep, SettingsDep, TenantDep
from api.schemas.artifacts import UsagePublic
from swav_service.quota import stored_bytes

router = APIRouter(prefix="/v1/usage", tags=["usage"])


@router.get("", response_model=UsagePublic)
def get_usage(session: SessionDep, settings: SettingsDep, tenant: TenantDep) -> UsagePublic:
    """Stored bytes by kind and the limit (SWAV_TENANT_MAX_STORED_BYTES); an upload, job,
    resume or embedding job is refused with 403 once `stored_bytes` reaches the limit."""
    used = stored_bytes(session, tenant)
    return UsagePublic(
        stored_bytes=used.total,
        limit_bytes=settings.tenant_max_stored_bytes or None,
        archives_bytes=used.archives,
        images_bytes=used.images,
        checkpoints_bytes=used.checkpoints,
        embeddings_bytes=used.embeddings,
        reserved_bytes=used.reserved,
        weights_bytes=used.weights,
    )
