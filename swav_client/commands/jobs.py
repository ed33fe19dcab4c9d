"""`swav jobs`: submit (or plan) a training job, list, show, cancel, resume, read its
event log, and follow one live until it finishes."""

from __future__ import annotations

from typing import Annotated

import typer

from swav_client import display
from swav_client.client import SwavClient
from swav_client.commands.options import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    Cursor,
    JsonFlag,
    Limit,
    options,
    reports_errors,
)
from swav_client.types import Job
from swav_core.config_parsing import parse_duration, parse_settings
from swav_core.errors import ConfigError

app = typer.Typer(help="Submit, follow and control training jobs.", no_args_is_help=True)

FollowFlag = Annotated[
    bool, typer.Option("--follow", "-f", help="Show live progress until the job finishes; "
                       "exit 0 if it succeeded, 1 otherwise.")
]


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
    display.print_result(job, as_json, display.job_details)
    if job.status != "succeeded":
        raise typer.Exit(EXIT_FAILED)


@app.command("submit")
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
    start_checkpoint: Annotated[
        str | None,
        typer.Option("--start-from-checkpoint",
                     help="Start from this checkpoint of one of your jobs."),
    ] = None,
    start_weights: Annotated[
        str | None,
        typer.Option("--start-from-weights", help="Start from these uploaded weights "
                     "(swav weights upload)."),
    ] = None,
    follow_job: FollowFlag = False,
    json_output: JsonFlag = False,
) -> None:
    """Submit a training job on a dataset."""
    if start_checkpoint is not None and start_weights is not None:
        raise typer.BadParameter("give one of --start-from-checkpoint and --start-from-weights")
    start_from = (
        {"checkpoint_id": start_checkpoint} if start_checkpoint is not None
        else {"weights_id": start_weights} if start_weights is not None
        else None
    )
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
            display.print_result(plan, opts.json, display.plan_details)
            return
        job = client.create_job(
            dataset, preset=preset, config=config, name=name, idempotency_key=idempotency_key,
            resources={"gpus": gpus, "nodes": nodes}, keep_best_by=keep_best_by,
            max_attempts=max_attempts, max_runtime_s=max_runtime, start_from=start_from,
        )
        if follow_job:
            display.print_notice(f"submitted {job.id}")
            follow(client, job, opts.json)
            return
    display.print_result(job, opts.json, display.job_details)


@app.command("list")
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
    display.print_page(page, opts.json, display.jobs_table)


@app.command("show")
@reports_errors
def jobs_show(ctx: typer.Context, job_id: str, json_output: JsonFlag = False) -> None:
    """One job: status, progress, metrics, ETA, error."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        display.print_result(client.get_job(job_id), opts.json, display.job_details)


@app.command("cancel")
@reports_errors
def jobs_cancel(ctx: typer.Context, job_id: str, json_output: JsonFlag = False) -> None:
    """Cancel: a queued job at once, a running one at its next step (checkpointed)."""
    opts = options(ctx, json_output)
    with opts.client() as client:
        display.print_result(client.cancel_job(job_id), opts.json, display.job_details)


@app.command("resume")
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
    display.print_result(job, opts.json, display.job_details)


@app.command("logs")
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
