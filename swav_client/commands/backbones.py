"""`swav backbones`: the backbone names a job's `config.backbone` accepts."""

from __future__ import annotations

from typing import Annotated

import typer

from swav_client import display
from swav_client.commands.options import JsonFlag, options, reports_errors


@reports_errors
def backbones(
    ctx: typer.Context,
    contains: Annotated[
        str | None, typer.Option(help="Only names containing this text, e.g. convnext.")
    ] = None,
    family: Annotated[
        str | None, typer.Option(help="own, timm or torchvision.")
    ] = None,
    json_output: JsonFlag = False,
) -> None:
    """List backbone names: ours, timm/<model> and torchvision/<model> (one per line)."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        found = client.list_backbones(contains=contains, family=family)
    if opts.json:
        display.print_json(found)
        return
    for name in found.data:
        display.out.print(name, markup=False, highlight=False)
