"""The backbone names a job may give, without torch: ours, timm's and torchvision's.

Read from swav_core/backbone_names.py (a catalog made from the pinned timm and the
installed torchvision), the same list that checks a job's `backbone` at submit.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.schemas.common import BackbonesPublic
from swav_core.backbone_names import (
    FAMILIES,
    all_backbone_names,
    family_version,
    split_family,
)

router = APIRouter(prefix="/v1/backbones", tags=["backbones"])


@router.get("", response_model=BackbonesPublic)
def list_backbones(
    contains: Annotated[
        str | None,
        Query(max_length=100, description="Only names containing this text (any case)."),
    ] = None,
    family: Annotated[
        Literal["own", "timm", "torchvision"] | None,
        Query(description="own: tiny_cnn, the ResNets; timm/...; torchvision/..."),
    ] = None,
) -> BackbonesPublic:
    """Every backbone name `config.backbone` accepts, filtered; all start from random
    weights (a job's `start_from` gives others) and nothing is downloaded."""
    needle = (contains or "").lower()
    names = [
        name
        for name in all_backbone_names()
        if needle in name.lower()
        and (family is None or (split_family(name)[0] or "own") == family)
    ]
    return BackbonesPublic(data=names, versions={f: family_version(f) for f in FAMILIES})
