"""`swav checkpoints`: list a job's checkpoints and download one, its sha256 checked."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swav_client import display
from swav_client.client import DOWNLOAD_FORMATS
from swav_client.commands.options import Cursor, JsonFlag, Limit, options, reports_errors

app = typer.Typer(help="List and download checkpoints.", no_args_is_help=True)


@app.command("list")
@reports_errors
def checkpoints_list(
    ctx: typer.Context,
    job_id: str,
    limit: Limit = None,
    cursor: Cursor = None,
    json_output: JsonFlag = False,
) -> None:
    """A job's checkpoints still on disk, newest first."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        page = client.list_checkpoints(job_id, limit=limit, cursor=cursor)
    display.print_page(page, opts.json, display.checkpoints_table)


@app.command("download")
@reports_errors
def checkpoints_download(
    ctx: typer.Context,
    checkpoint_id: str,
    format: Annotated[
        str, typer.Option(help="full: training state (.pt); safetensors: the model; "
                          "backbone: for torchvision (our own and torchvision backbones); "
                          "timm: for timm.create_model(checkpoint_path=...) (timm "
                          "backbones); onnx: the backbone for onnxruntime. The checkpoint's "
                          "export_formats lists those that apply.")
    ] = "full",
    out: Annotated[
        Path, typer.Option(help="A file, or a folder for the server's file name.")
    ] = Path("."),
    json_output: JsonFlag = False,
) -> None:
    """Download a checkpoint (sha256 checked)."""
    if format not in DOWNLOAD_FORMATS:
        raise typer.BadParameter(f"use one of {', '.join(DOWNLOAD_FORMATS)}", param_hint="--format")
    opts = options(ctx, json_output)
    with opts.client() as client, display.transfer_bar(checkpoint_id) as advance:
        path = client.download_checkpoint(checkpoint_id, out, format=format, progress=advance)
    if opts.json:
        display.print_json({"checkpoint_id": checkpoint_id, "format": format, "path": str(path)})
    else:
        display.out.print(f"saved {path}", markup=False)
