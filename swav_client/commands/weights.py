"""`swav weights`: upload a safetensors file that jobs may start from, list, show, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swav_client import display
from swav_client.commands.options import Cursor, JsonFlag, Limit, options, reports_errors

app = typer.Typer(help="Upload weights that jobs start from.", no_args_is_help=True)


@app.command("upload")
@reports_errors
def weights_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A .safetensors state dict.")],
    name: Annotated[str | None, typer.Option(help="Default: the file name's stem.")] = None,
    json_output: JsonFlag = False,
) -> None:
    """Upload a safetensors state dict (a backbone export, torchvision or timm weights);
    start a job from it with `swav jobs submit --start-from-weights ID`."""
    opts = options(ctx, json_output)
    with opts.client() as client, display.transfer_bar(file.name) as advance:
        weights = client.upload_weights(file, name=name, progress=advance)
    display.print_result(weights, opts.json, display.weights_details)


@app.command("list")
@reports_errors
def weights_list(
    ctx: typer.Context, limit: Limit = None, cursor: Cursor = None, json_output: JsonFlag = False
) -> None:
    """Uploaded weights, newest first."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        page = client.list_weights(limit=limit, cursor=cursor)
    display.print_page(page, opts.json, display.weights_table)


@app.command("show")
@reports_errors
def weights_show(ctx: typer.Context, weights_id: str, json_output: JsonFlag = False) -> None:
    opts = options(ctx, json_output)
    with opts.client() as client:
        weights = client.get_weights(weights_id)
    display.print_result(weights, opts.json, display.weights_details)


@app.command("delete")
@reports_errors
def weights_delete(ctx: typer.Context, weights_id: str) -> None:
    """Delete uploaded weights (a queued job that starts from them fails)."""
    with options(ctx, False).client() as client:
        client.delete_weights(weights_id)
    display.print_notice(f"deleted {weights_id}")
