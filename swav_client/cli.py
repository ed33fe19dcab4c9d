"""`swav`: the service from a shell. Server and key from `--url` / `--api-key` or the
SWAV_URL / SWAV_API_KEY environment variables; `--json` prints results as JSON.

Exit status: 0 success; 1 an API error, an unreachable server, or a followed job that
ended failed or cancelled; 2 a usage error; 130 interrupted (a followed job keeps running).

The subcommands live in `swav_client/commands/`, one module per resource.
"""

from __future__ import annotations

from typing import Annotated

import typer

from swav_client.commands import backbones, checkpoints, datasets, embeddings, jobs, weights
from swav_client.commands.options import JsonFlag, Options
from swav_client.session import DEFAULT_URL

app = typer.Typer(
    name="swav",
    help="SwAV pretraining as a service: datasets, jobs, checkpoints, embeddings.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(datasets.app, name="datasets")
app.add_typer(jobs.app, name="jobs")
app.add_typer(checkpoints.app, name="checkpoints")
app.add_typer(weights.app, name="weights")
app.command("embed")(embeddings.embed)
app.command("backbones")(backbones.backbones)


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


def main() -> None:
    app(prog_name="swav")
