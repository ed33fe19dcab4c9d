"""`swav datasets`: upload a folder or an archive, list and show datasets."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from swav_client import display
from swav_client.commands.options import (
    EXIT_FAILED,
    Cursor,
    JsonFlag,
    Limit,
    options,
    reports_errors,
)
from swav_client.errors import NotUploadable

app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)


@app.command("upload")
@reports_errors
def datasets_upload(
    ctx: typer.Context,
    path: Annotated[
        Path, typer.Argument(exists=True, help="A folder of images (one subfolder per class, "
                             "or flat), or a .zip/.tar/.tar.gz archive.")
    ],
    name: Annotated[str | None, typer.Option(help="Default: the folder or file name.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until validated (ready or failed).")] = True,
    json_output: JsonFlag = False,
) -> None:
    """Upload a dataset; a folder is packed to tar while it streams."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        with display.transfer_bar(f"upload {path.name}") as advance:
            try:
                dataset = client.upload_dataset(path, name=name, progress=advance)
            except NotUploadable as exc:  # found before anything is sent (an empty folder)
                raise typer.BadParameter(str(exc), param_hint="PATH") from None
        if wait:
            with display.spinner(f"validating {dataset.id}"):
                dataset = client.wait_dataset(dataset.id)
    display.print_result(dataset, opts.json, display.dataset_details)
    if dataset.status == "failed":
        raise typer.Exit(EXIT_FAILED)


@app.command("list")
@reports_errors
def datasets_list(
    ctx: typer.Context, limit: Limit = None, cursor: Cursor = None, json_output: JsonFlag = False
) -> None:
    """The datasets, newest first."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        page = client.list_datasets(limit=limit, cursor=cursor)
    display.print_page(page, opts.json, display.datasets_table)


@app.command("show")
@reports_errors
def datasets_show(ctx: typer.Context, dataset_id: str, json_output: JsonFlag = False) -> None:
    """One dataset: status, images, skipped files, classes."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        dataset = client.get_dataset(dataset_id)
    display.print_result(dataset, opts.json, display.dataset_details)
    if opts.json:
        return
    for skipped in dataset.skipped or []:
        if isinstance(skipped, dict):  # {"path", "reason"}
            skipped = f"{skipped.get('path')}: {skipped.get('reason')}"
        display.print_notice(f"  skipped {skipped}")
