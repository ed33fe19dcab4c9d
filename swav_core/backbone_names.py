"""The backbones a config may name, without importing torch: the API checks a job's
`backbone` at submit with `backbone_name_problem`, and swav_core/model.py builds each one.

Three kinds of name:
- our own: `tiny_cnn`, torchvision's ImageNet ResNets by their bare names, and the small
  ResNets `small_resnet{10,18}_w{16,32,64}`;
- `timm/<name>`: any model of timm's `list_models()` (e.g. `timm/convnext_atto`);
- `torchvision/<name>`: any classification model of torchvision (e.g.
  `torchvision/efficientnet_b0`).
The last two are read from backbone_catalog.json (made by swav_core/backbone_catalog.py
from the pinned timm and the installed torchvision). Every backbone starts from random
weights unless the job names starting weights; nothing is ever downloaded.
"""

from __future__ import annotations

import difflib
import json
from functools import cache
from pathlib import Path

TORCHVISION_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2",
)
"""torchvision's ResNets, randomly initialised (no weights are downloaded)."""

SMALL_RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}
SMALL_RESNET_WIDTHS = (16, 32, 64)
SMALL_RESNETS = {
    f"small_resnet{depth}_w{width}": (width, blocks)
    for depth, blocks in SMALL_RESNET_BLOCKS.items()
    for width in SMALL_RESNET_WIDTHS
}
"""ResNets for small images and CPU budgets: name -> (width, blocks per stage)."""

BACKBONES: tuple[str, ...] = tuple(sorted(("tiny_cnn", *TORCHVISION_RESNETS, *SMALL_RESNETS)))
"""Our own names (the families below are named `<family>/<model>`)."""

FAMILIES = ("timm", "torchvision")
CATALOG_PATH = Path(__file__).with_name("backbone_catalog.json")
HOW_TO_LIST = (
    "list the valid names with `GET /v1/backbones?contains=...` or `swav backbones --contains ...`"
)


@cache
def family_names(family: str) -> tuple[str, ...]:
    """The model names of `family` ('timm' or 'torchvision'), sorted."""
    catalog = json.loads(CATALOG_PATH.read_text())
    return tuple(catalog[family]["names"])


@cache
def family_version(family: str) -> str:
    return str(json.loads(CATALOG_PATH.read_text())[family]["version"])


def all_backbone_names() -> tuple[str, ...]:
    """Every name a config may give: ours, then `timm/...`, then `torchvision/...`."""
    return BACKBONES + tuple(f"{f}/{n}" for f in FAMILIES for n in family_names(f))


def split_family(name: str) -> tuple[str | None, str]:
    """'timm/convnext_atto' -> ('timm', 'convnext_atto'); 'resnet50' -> (None, 'resnet50')."""
    family, slash, model = name.partition("/")
    return (family, model) if slash else (None, name)


def backbone_name_problem(name: str) -> str | None:
    """Why `name` is not a backbone a config may give (with close names and how to list the
    valid ones), or None when it is one."""
    family, model = split_family(name)
    if family is None:
        if name in BACKBONES:
            return None
        pool: tuple[str, ...] = BACKBONES + tuple(f"timm/{n}" for n in family_names("timm"))
    elif family in FAMILIES:
        if model in family_names(family):
            return None
        if family == "timm" and "." in model and model.split(".")[0] in family_names("timm"):
            return (
                f"backbone {name!r} names pretrained weights (the part after '.'); no "
                f"weights are downloaded: use 'timm/{model.split('.')[0]}' and give the "
                "weights file as the job's start_from"
            )
        pool = tuple(f"{family}/{n}" for n in family_names(family))
    else:
        return (
            f"unknown backbone family {family!r} in {name!r}: use one of our names, "
            f"'timm/<model>' (timm {family_version('timm')}) or 'torchvision/<model>' "
            f"(torchvision {family_version('torchvision')}); {HOW_TO_LIST}"
        )
    close = difflib.get_close_matches(name, pool, n=3, cutoff=0.75)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    ours = f"our own are {', '.join(BACKBONES)}, and " if family is None else ""
    return (
        f"unknown backbone {name!r}; {hint}{ours}any timm or torchvision model is named "
        f"'timm/<model>' or 'torchvision/<model>': {HOW_TO_LIST}"
    )
