"""`swav embed`: embed image files with a checkpoint's model into a .npy matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from swav_client import display
from swav_client.client import EMBED_BATCH
from swav_client.commands.options import JsonFlag, options, reports_errors


@reports_errors
def embed(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", help="A checkpoint id, or a job id "
                                       "(its latest checkpoint).")],
    images: Annotated[list[Path], typer.Argument(help="Image files; row i is the i-th.")],
    out: Annotated[Path, typer.Option("--out", help="The .npy file to write (float32, N x D).")],
    layer: Annotated[str, typer.Option(help="backbone or projection.")] = "backbone",
    normalize: Annotated[bool, typer.Option(help="L2-normalise each row.")] = True,
    batch_size: Annotated[int, typer.Option(help="Images per request.", min=1)] = EMBED_BATCH,
    json_output: JsonFlag = False,
) -> None:
    """Embed images with a checkpoint's model and save them as a .npy matrix."""
    missing = [str(p) for p in images if not p.is_file()]
    if missing:
        raise typer.BadParameter(f"not files: {', '.join(missing[:5])}", param_hint="IMAGES")
    opts = options(ctx, json_output)
    with opts.client() as client, display.spinner(f"embedding {len(images)} images"):
        result = client.embed(
            model, images, layer=layer, normalize=normalize, batch_size=batch_size
        )
    with open(out, "wb") as f:  # np.save(path) would append .npy to another suffix
        np.save(f, result.vectors)
    summary = {"model": result.model, "rows": len(images), "dim": result.dim, "out": str(out)}
    if opts.json:
        display.print_json(summary)
    else:
        display.out.print(
            f"wrote {len(images)} x {result.dim} to {out} (checkpoint {result.model})",
            markup=False,
        )
