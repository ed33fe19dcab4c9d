"""`swav`: the service from a shell. Server and key from `--url` / `--api-key` or the
SWAV_URL / SWAV_API_KEY environment variables; `--json` prints results as JSON.

Exit status: 0 success; 1 an API error, an unreachable server, or a followed job that
ended failed or cancelled; 2 a usage error; 130 interrupted (a followed job keeps running).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, ParamSpec, TypeVar, cast

import typer

from swav_client import display
from swav_client.client import DOWNLOAD_FORMATS, EMBED_BATCH, SwavClient
from swav_client.errors import ApiError, NotUploadable, SwavClientError
from swav_client.session import DEFAULT_URL
from swav_client.types import Job
from swav_core.config import parse_duration, parse_settings
from swav_core.errors import ConfigError

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="swav",
    help="SwAV pretraining as a service: datasets, jobs, checkpoints, embeddings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
datasets_app = typer.Typer(help="Upload and inspect datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="Submit, follow and control training jobs.", no_args_is_help=True)
checkpoints_app = typer.Typer(help="List and download checkpoints.", no_args_is_help=True)
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
app.add_typer(checkpoints_app, name="checkpoints")


@dataclass(frozen=True)
class Options:
    url: str
    api_key: str | None
    json: bool
    timeout: float

    def client(self) -> SwavClient:
        return SwavClient(self.url, api_key=self.api_key, timeout=self.timeout)


JsonFlag = Annotated[
    bool, typer.Option("--json", help="Print the result as JSON (errors too, on stderr).")
]
Limit = Annotated[int | None, typer.Option(help="At most this many (server default 50).")]
Cursor = Annotated[str | None, typer.Option(help="`next_cursor` of the previous page.")]


@app.callback()
def root(
    ctx: typer.Context,
    url: Annotated[
        str, typer.Option("--url", envvar="SWAV_URL", help="The service's base URL.")
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", envvar="SWAV_API_KEY", help="Sent as a Bearer token."),
    ] = None,
    json_output: JsonFlag = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for an answer.")] = 60.0,
) -> None:
    ctx.obj = Options(url=url, api_key=api_key, json=json_output, timeout=timeout)


P = ParamSpec("P")
T = TypeVar("T")


def options(ctx: typer.Context, json_output: bool) -> Options:
    """The root options, with a command's own `--json` (`swav jobs list --json`) merged."""
    found: Options = ctx.find_object(Options) or Options(DEFAULT_URL, None, False, 60.0)
    return replace(found, json=True) if json_output else found


def reports_errors(command: Callable[P, T]) -> Callable[P, T]:
    """Turn the client's errors into a message on stderr (with --json, the API's error
    envelope) and exit status 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return command(*args, **kwargs)
        except SwavClientError as exc:
            # Every command takes ctx and json_output, which typer passes by keyword.
            ctx = kwargs.get("ctx")
            as_json = bool(kwargs.get("json_output")) or (
                ctx is not None and options(cast(typer.Context, ctx), False).json
            )
            if as_json:
                display.err.print_json(json.dumps(exc.envelope()))
            elif isinstance(exc, ApiError):
                display.print_error(f"{exc.status} {exc.code}: {exc.message}")
            else:
                display.print_error(str(exc))
            raise typer.Exit(EXIT_FAILED) from None

    return run


# ------------------------------------------------------------------------ datasets


@datasets_app.command("upload")
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
    if opts.json:
        display.print_json(dataset)
    else:
        display.out.print(display.dataset_details(dataset))
    if dataset.status == "failed":
        raise typer.Exit(EXIT_FAILED)


@datasets_app.command("list")
@reports_errors
def datasets_list(
    ctx: typer.Context, limit: Limit = None, cursor: Cursor = None, json_output: JsonFlag = False
) -> None:
    """The datasets, newest first."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        page = client.list_datasets(limit=limit, cursor=cursor)
    if opts.json:
        display.print_json(page)
        return
    display.out.print(display.datasets_table(page.data))
    if page.next_cursor:
        display.print_notice(f"more: --cursor {page.next_cursor}")


@datasets_app.command("show")
@reports_errors
def datasets_show(ctx: typer.Context, dataset_id: str, json_output: JsonFlag = False) -> None:
    """One dataset: status, images, skipped files, classes."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        dataset = client.get_dataset(dataset_id)
    if opts.json:
        display.print_json(dataset)
    else:
        display.out.print(display.dataset_details(dataset))
        for skipped in dataset.skipped or []:
            if isinstance(skipped, dict):  # {"path", "reason"}
                skipped = f"{skipped.get('path')}: {skipped.get('reason')}"
            display.print_notice(f"  skipped {skipped}")


# ------------------------------------------------------------------------ jobs


def follow(client: SwavClient, job: Job, as_json: bool) -> None:
    """Show the job's live bar until it finishes; exit 0 if it succeeded, else 1."""
    try:
        with display.JobProgress(job) as bar:
            for event in client.stream_events(job.id):
                bar(event)
            job = client.get_job(job.id)
            bar.finish(job)
    except KeyboardInterrupt:
        display.print_notice(f"stopped following; {job.id} goes on (swav jobs show {job.id})")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    show_job(job, as_json)
    if job.status != "succeeded":
        raise typer.Exit(EXIT_FAILED)


def show_job(job: Job, as_json: bool) -> None:
    if as_json:
        display.print_json(job)
    else:
        display.out.print(display.job_details(job))


FollowFlag = Annotated[
    bool, typer.Option("--follow", "-f", help="Show live progress until the job finishes; "
                       "exit 0 if it succeeded, 1 otherwise.")
]


@jobs_app.command("submit")
@reports_errors
def jobs_submit(
    ctx: typer.Context,
    dataset: Annotated[str, typer.Option("--dataset", help="A ready dataset's id.")],
    preset: Annotated[
        str | None,
        typer.Option(help="auto (default: chosen from the data and the workers), or a name: "
                     "imagenet-800ep, imagenet-100ep, small-batch, cpu-tiny."),
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="A TrainConfig override, key=value (repeatable), read as "
                     "the field's type: epochs=20, size_crops=32,24, precision=bf16."),
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(help="Training time instead of epochs (config.budget_s): 1200, 20m, 1h30m."),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the resolved config, why, and the estimated time "
                     "and memory; queue nothing."),
    ] = False,
    name: Annotated[str | None, typer.Option(help="A name for the job.")] = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option(help="Repeat a submission safely: the same key returns the same job."),
    ] = None,
    gpus: Annotated[int, typer.Option(help="Ranks per node (GPUs, or CPU processes).")] = 1,
    nodes: Annotated[int, typer.Option(help="Workers the job spans (gang-scheduled).")] = 1,
    keep_best_by: Annotated[
        str | None, typer.Option(help="knn_top1 or linear_top1: keep the best checkpoint.")
    ] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Runs after lost workers before worker_lost.")
    ] = None,
    max_runtime: Annotated[
        float | None, typer.Option(help="Seconds of running time before `timeout`.")
    ] = None,
    follow_job: FollowFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Submit a training job on a dataset."""
    opts = options(ctx, json_output)
    try:
        config = parse_settings(settings or [])
    except ConfigError as error:
        raise typer.BadParameter(str(error)) from None
    if budget is not None:
        try:
            config["budget_s"] = parse_duration(budget)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--budget") from None
    with opts.client() as client:
        if dry_run:
            plan = client.plan_job(dataset, preset=preset, config=config,
                                   resources={"gpus": gpus, "nodes": nodes})
            if opts.json:
                display.print_json(plan)
            else:
                display.out.print(display.plan_details(plan))
            return
        job = client.create_job(
            dataset, preset=preset, config=config, name=name, idempotency_key=idempotency_key,
            resources={"gpus": gpus, "nodes": nodes}, keep_best_by=keep_best_by,
            max_attempts=max_attempts, max_runtime_s=max_runtime,
        )
        if follow_job:
            display.print_notice(f"submitted {job.id}")
            follow(client, job, opts.json)
            return
    show_job(job, opts.json)


@jobs_app.command("list")
@reports_errors
def jobs_list(
    ctx: typer.Context,
    status: Annotated[
        str | None, typer.Option(help="Comma-separated statuses, e.g. queued,running.")
    ] = None,
    limit: Limit = None,
    cursor: Cursor = None,
    json_output: JsonFlag = False,
) -> None:
    """The jobs, newest first."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        page = client.list_jobs(status=status, limit=limit, cursor=cursor)
    if opts.json:
        display.print_json(page)
        return
    display.out.print(display.jobs_table(page.data))
    if page.next_cursor:
        display.print_notice(f"more: --cursor {page.next_cursor}")


@jobs_app.command("show")
@reports_errors
def jobs_show(ctx: typer.Context, job_id: str, json_output: JsonFlag = False) -> None:
    """One job: status, progress, metrics, ETA, error."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        show_job(client.get_job(job_id), opts.json)


@jobs_app.command("cancel")
@reports_errors
def jobs_cancel(ctx: typer.Context, job_id: str, json_output: JsonFlag = False) -> None:
    """Cancel: a queued job at once, a running one at its next step (checkpointed)."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        show_job(client.cancel_job(job_id), opts.json)


@jobs_app.command("resume")
@reports_errors
def jobs_resume(
    ctx: typer.Context, job_id: str, follow_job: FollowFlag = False, json_output: JsonFlag = False
) -> None:
    """Queue a cancelled or failed job again, from its latest checkpoint."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        job = client.resume_job(job_id)
        if follow_job:
            follow(client, job, opts.json)
            return
    show_job(job, opts.json)


@jobs_app.command("logs")
@reports_errors
def jobs_logs(
    ctx: typer.Context,
    job_id: str,
    after: Annotated[int, typer.Option(help="Only events after this seq.")] = 0,
    follow_job: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing until the job finishes; "
                           "exit 0 if it succeeded, 1 otherwise.")
    ] = False,
    json_output: JsonFlag = False,
) -> None:
    """The job's event log (states, metrics, checkpoints, warnings); JSON: one per line."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        events = client.stream_events(job_id, after) if follow_job else client.iter_events(
            job_id, after
        )
        try:
            for event in events:
                if opts.json:
                    display.print_json_line(event)
                else:
                    display.out.print(display.event_line(event), markup=False, soft_wrap=True)
        except KeyboardInterrupt:
            raise typer.Exit(EXIT_INTERRUPTED) from None
        if follow_job and client.get_job(job_id).status != "succeeded":
            raise typer.Exit(EXIT_FAILED)


# ------------------------------------------------------------------------ checkpoints


@checkpoints_app.command("list")
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
    if opts.json:
        display.print_json(page)
        return
    display.out.print(display.checkpoints_table(page.data))
    if page.next_cursor:
        display.print_notice(f"more: --cursor {page.next_cursor}")


@checkpoints_app.command("download")
@reports_errors
def checkpoints_download(
    ctx: typer.Context,
    checkpoint_id: str,
    format: Annotated[
        str, typer.Option(help="full: training state (.pt); safetensors: the model; "
                          "backbone: torchvision-loadable backbone.")
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


# ------------------------------------------------------------------------ embeddings


@app.command("embed")
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
    import numpy as np

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


def main() -> None:
    app(prog_name="swav")
