"""Write `backbone_catalog.json`: the timm and torchvision model names a config may name.

The API checks a job's `backbone` at submit without importing torch, so the names of the
two libraries' classification models are kept in a JSON file beside this module, made by
`python -m swav_core.backbone_catalog` from the pinned versions (pyproject.toml) and
checked against the installed libraries by tests/core/test_backbone_families.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CATALOG_PATH = Path(__file__).with_name("backbone_catalog.json")


def installed_catalog() -> dict[str, dict[str, object]]:
    """{family: {"version": ..., "names": [...]}} from the installed timm and torchvision."""
    import timm
    import torchvision

    return {
        "timm": {"version": timm.__version__, "names": sorted(timm.list_models())},
        "torchvision": {
            "version": torchvision.__version__.split("+")[0],
            "names": sorted(torchvision.models.list_models(module=torchvision.models)),
        },
    }


def main() -> None:
    CATALOG_PATH.write_text(json.dumps(installed_catalog(), indent=0) + "\n")
    print(f"wrote {CATALOG_PATH}", file=sys.stderr)


if __name__ == "__main__":
    main()
