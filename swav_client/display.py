"""How the `swav` command shows things: tables and bars on a terminal, JSON for scripts.

Results go to stdout; progress bars, notices and errors to stderr, so that
`swav --json ... > out.json` captures only the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, TypeVar

from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from swav_client.types import Checkpoint, Dataset, Event, Job, JobPlan, Page, Resource, Weights
from swav_client.upload import TransferProgress

out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

M = TypeVar("M", bound=Resource)

STATUS_STYLE = {
    "ready": "green",
    "succeeded": "green",
    "running": "cyan",
    "validating": "cyan",
    "queued": "yellow",
    "cancelling": "yellow",
    "failed": "red",
    "cancelled": "magenta",
}


def print_json(value: BaseModel | dict[str, Any] | list[Any]) -> None:
    """One JSON document on stdout (plain print: no markup, no wrapping)."""
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    print(json.dumps(data, indent=2, ensure_ascii=False), flush=True)


def print_json_line(value: BaseModel) -> None:
    print(value.model_dump_json(), flush=True)


def print_result(value: M, as_json: bool, details: Callable[[M], Table]) -> None:
    """One resource: JSON on stdout for scripts, else the table `details` draws of it."""
    if as_json:
        print_json(value)
    else:
        out.print(details(value))


def print_page(page: Page[M], as_json: bool, table: Callable[[list[M]], Table]) -> None:
    """One page of a listing: JSON, or the table and, on stderr, how to ask for the next."""
    if as_json:
        print_json(page)
        return
    out.print(table(page.data))
    if page.next_cursor:
        print_notice(f"more: --cursor {page.next_cursor}")


def status_text(status: str) -> Text:
    return Text(status, style=STATUS_STYLE.get(status, ""))


def cells(*values: Any) -> list[Text]:
    """Table cells as plain text: names and messages from the server are never markup."""
    return [value if isinstance(value, Text) else Text(str(value)) for value in values]


def when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def epoch_text(step: int, epoch: int, epochs: int) -> str:
    """The epoch as "2/10", counting from 1: the API's `epoch` is the 0-based index of the epoch
    of the last step (0 before any step)."""
    return f"{min(epoch + 1, epochs) if step else 0}/{epochs}"


def number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}g}" if isinstance(value, int | float) else "-"


# ------------------------------------------------------------------------ resources


def datasets_table(datasets: Iterable[Dataset]) -> Table:
    table = Table("id", "name", "status", "images", "skipped", "classes", "size", "created")
    for d in datasets:
        classes = str(len(d.classes)) if d.classes else "-"
        table.add_row(*cells(
            d.id, d.name, status_text(d.status), d.num_images or "-", d.num_skipped or 0,
            classes, human_bytes(d.archive_bytes), when(d.created_at),
        ))
    return table


def jobs_table(jobs: Iterable[Job]) -> Table:
    table = Table("id", "name", "status", "preset", "step", "epoch", "loss", "dataset", "created")
    for j in jobs:
        p = j.progress
        table.add_row(*cells(
            j.id, j.name or "-", status_text(j.status), j.preset or "-",
            f"{p.step}/{p.total_steps or '?'}", epoch_text(p.step, p.epoch, p.epochs),
            number((j.metrics or {}).get("loss")), j.dataset_id, when(j.created_at),
        ))
    return table


def checkpoints_table(checkpoints: Iterable[Checkpoint]) -> Table:
    table = Table("id", "step", "epoch", "final", "loss", "knn top-1", "size", "created")
    for c in checkpoints:
        quality = c.quality or {}
        table.add_row(*cells(
            c.id, c.step, c.epoch, "yes" if c.final else "",
            number((c.metrics or {}).get("loss")), number(quality.get("knn_top1"), 3),
            human_bytes(c.size_bytes), when(c.created_at),
        ))
    return table


def details(rows: Iterable[tuple[str, Any]]) -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(*cells(key, value))
    return table


def dataset_details(d: Dataset) -> Table:
    rows: list[tuple[str, Any]] = [
        ("id", d.id), ("name", d.name), ("status", status_text(d.status)),
        ("images", d.num_images if d.num_images is not None else "-"),
        ("skipped", d.num_skipped or 0),
        ("classes", ", ".join(map(str, d.classes)) if d.classes else "-"),
        ("archive", human_bytes(d.archive_bytes)), ("created", when(d.created_at)),
    ]
    if d.error is not None:
        rows.append(("error", f"{d.error.code}: {d.error.message}"))
    return details(rows)


def job_details(j: Job) -> Table:
    p, metrics = j.progress, j.metrics or {}
    rows: list[tuple[str, Any]] = [
        ("id", j.id), ("name", j.name or "-"), ("status", status_text(j.status)),
        ("dataset", j.dataset_id), ("preset", j.preset or "-"),
        ("progress", f"step {p.step}/{p.total_steps or '?'}, "
                     f"epoch {epoch_text(p.step, p.epoch, p.epochs)}"),
        ("loss", number(metrics.get("loss"))), ("lr", number(metrics.get("lr"))),
        ("eta", duration(j.eta_s)), ("compute", duration(j.compute_seconds)),
        ("attempt", j.attempt), ("created", when(j.created_at)),
        ("started", when(j.started_at)), ("finished", when(j.finished_at)),
    ]
    if j.start_from:
        start = j.start_from.get("checkpoint_id") or j.start_from.get("weights_id")
        rows.insert(5, ("starts from", start))
    if j.error is not None:
        rows.append(("error", f"{j.error.code}: {j.error.message}"))
    return details(rows)


def weights_table(weights: Iterable[Weights]) -> Table:
    table = Table("id", "name", "backbone", "tensors", "size", "created")
    for w in weights:
        table.add_row(*cells(
            w.id, w.name, w.backbone or "-", w.num_tensors, human_bytes(w.size_bytes),
            when(w.created_at),
        ))
    return table


def weights_details(w: Weights) -> Table:
    return details([
        ("id", w.id), ("name", w.name), ("backbone", w.backbone or "-"),
        ("tensors", w.num_tensors), ("size", human_bytes(w.size_bytes)), ("sha256", w.sha256),
        ("created", when(w.created_at)),
    ])


def plan_details(plan: JobPlan) -> Table:
    """A dry run: the chosen fields with their reasons, then the estimate per worker kind."""
    table = Table(show_header=True, box=None, pad_edge=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    table.add_column("why", style="dim")
    for name, why in plan.reasons.items():
        value = plan.config.get(name, "-")
        table.add_row(escape(name), escape(_compact(value)), escape(why))
    for e in plan.estimates:
        fits = "" if e.fits_memory else " (does not fit in memory)"
        table.add_row(
            "estimate", escape(f"{e.machine} x{e.workers}"),
            f"{duration(e.seconds_per_epoch)} per epoch, {duration(e.total_seconds)} in all, "
            f"{e.peak_memory_gib:.2f} GiB per rank{fits}",
        )
    return table


def event_line(event: Event) -> str:
    fields = " ".join(f"{k}={_compact(v)}" for k, v in event.data.items())
    return f"{event.seq:>5}  {when(event.created_at)}  {event.type:<10} {fields}"


def _compact(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


# ------------------------------------------------------------------------ progress


@contextmanager
def transfer_bar(description: str, total: int | None = None) -> Iterator[TransferProgress]:
    """A bytes bar on stderr, shown from the first byte (a request refused at once shows
    none); yields `advance(n, total)`, where a total once known sets the bar's."""
    columns = (
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
        TransferSpeedColumn(), TimeRemainingColumn(),
    )
    progress = Progress(*columns, console=err)
    task = progress.add_task(description, total=total)
    known = total

    def advance(n: int, total: int | None = None) -> None:
        nonlocal known
        if not progress.live.is_started:
            progress.start()
        if total is not None and total != known:
            progress.update(task, total=total)
            known = total
        progress.advance(task, n)

    try:
        yield advance
    finally:
        if progress.live.is_started:
            progress.stop()


@contextmanager
def spinner(description: str) -> Iterator[None]:
    with Progress(SpinnerColumn(), TextColumn(description), console=err, transient=True):
        yield


class JobProgress:
    """The live bar of `--follow`: step/total, epoch, loss, lr, images/s and ETA.

    Feed it the job's events; state changes and warnings are printed above the bar. The
    ETA is the server's (from the measured step time), not the bar's own guess.
    """

    def __init__(self, job: Job) -> None:
        self.job_id = job.id
        self.epochs = job.progress.epochs
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            TextColumn("step {task.completed:.0f}/{task.fields[total_text]}"),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("lr {task.fields[lr]}"),
            TextColumn("{task.fields[ips]} img/s"),
            TextColumn("ETA {task.fields[eta]}"),
            console=err,
        )
        p = job.progress
        self.task: TaskID = self.progress.add_task(
            job.id, total=p.total_steps, completed=p.step, total_text=p.total_steps or "?",
            epoch=epoch_text(p.step, p.epoch, p.epochs), loss="-", lr="-", ips="-",
            eta=duration(job.eta_s),
        )

    def __enter__(self) -> JobProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def __call__(self, event: Event) -> None:
        data = event.data
        if event.type == "state":
            status = status_text(str(data.get("status", "?")))
            self.progress.console.print(Text(f"{self.job_id}: ").append_text(status))
        elif event.type == "started":
            total = data.get("total_steps")
            step = data.get("step", 0)
            self.progress.update(
                self.task, total=total, completed=step, total_text=total or "?",
                epoch=epoch_text(step, data.get("epoch", 0), self.epochs),
            )
        elif event.type == "metrics":
            total, step = data.get("total_steps"), data.get("step", 0)
            self.progress.update(
                self.task, total=total, completed=step, total_text=total or "?",
                epoch=epoch_text(step, data.get("epoch", 0), self.epochs),
                loss=number(data.get("loss")),
                lr=number(data.get("lr"), 3), ips=number(data.get("images_per_s"), 3),
                eta=duration(data.get("eta_s")),
            )
        elif event.type == "warning":
            message = escape(str(data.get("message", data)))
            self.progress.console.print(f"[yellow]warning:[/] {message}")

    def finish(self, job: Job) -> None:
        p = job.progress
        self.progress.update(
            self.task, completed=p.step, total=p.total_steps or p.step,
            total_text=p.total_steps or p.step, epoch=epoch_text(p.step, p.epoch, p.epochs),
            eta=duration(0 if job.status == "succeeded" else job.eta_s),
        )


def print_error(message: str) -> None:
    err.print(f"[red]error:[/] {escape(message)}", soft_wrap=True)


def print_notice(message: str) -> None:
    err.print(message, soft_wrap=True, markup=False)
