"""`--set key=value`: one parser (`swav_core.config_parsing.parse_settings`) for `swav-train` and
`swav jobs submit`, values read as their TrainConfig field's type.

Before, `swav-train --set size_crops=32,24` gave a list while `swav jobs submit` sent the
text "32,24" and got a 422; these tests hold both commands to the same dict.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from swav_client import SwavClient
from swav_client import cli as client_cli
from swav_client.commands.options import Options
from swav_core.config_parsing import parse_settings
from swav_core.errors import ConfigError

PAIRS = ["size_crops=32,24", "epochs=3", "precision=bf16", "checkpoint_at_start=true",
         "budget_s=90"]
EXPECTED = {"size_crops": [32, 24], "epochs": 3, "precision": "bf16",
            "checkpoint_at_start": True, "budget_s": 90.0}


def set_args(pairs: list[str]) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


def client_request_config(pairs: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The `config` that `swav jobs submit --dry-run --set ...` sends in its JSON body, read
    off the wire by a mock transport that answers with a plan."""
    sent: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        return httpx.Response(200, json={"dry_run": True, "preset": body["preset"],
                                         "config": body["config"], "reasons": {},
                                         "estimates": []})

    def mock_client(options: Options) -> SwavClient:
        return SwavClient(options.url, api_key="swav_test", transport=httpx.MockTransport(answer))

    monkeypatch.setattr(Options, "client", mock_client)
    result = CliRunner().invoke(client_cli.app, ["--json", "jobs", "submit", "--dataset",
                                                 "ds_0000000000000000", "--preset", "cpu-tiny",
                                                 "--dry-run", *set_args(pairs)])
    assert result.exit_code == 0, result.output
    (body,) = sent
    return dict(body["config"])


def test_both_commands_parse_the_same(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert parse_settings(PAIRS) == EXPECTED

    # `swav jobs submit`: the list goes over the wire as a JSON list, not the text "32,24".
    assert client_request_config(PAIRS, monkeypatch) == EXPECTED

    # `swav-train`: its dry run prints the resolved config, which holds the same values.
    from swav_core.cli import train_main  # imports torch; keep it out of the client's path

    assert train_main(["--preset", "cpu-tiny", *set_args(PAIRS), "--data", str(tmp_path),
                       "--out", str(tmp_path / "run"), "--dry-run"]) == 0
    resolved = json.loads(capsys.readouterr().out)["config"]
    assert {key: resolved[key] for key in EXPECTED} == EXPECTED


@pytest.mark.parametrize(
    ("pair", "value"),
    [
        ("n_crops=[2, 6]", [2, 6]),  # the JSON-like form the old parsers took
        ("min_scale_crops=0.4,0.2", [0.4, 0.2]),
        ("size_crops=32", [32]),
        ("base_lr=1e-3", 0.001),
        ("deterministic=no", False),
        ("sync_bn=1", True),
        ("budget_s=none", None),
        ("backbone=resnet18", "resnet18"),
        ("optimizer=sgd", "sgd"),
    ],
)
def test_values_take_their_field_type(pair: str, value: Any) -> None:
    ((key, parsed),) = parse_settings([pair]).items()
    assert key == pair.partition("=")[0]
    assert parsed == value and type(parsed) is type(value)


@pytest.mark.parametrize(
    ("pair", "message"),
    [
        ("size_crop=32,24", "--set size_crop=32,24: unknown key 'size_crop'; did you mean "
                            "size_crops or n_crops?"),
        ("bogus=1", "--set bogus=1: unknown key 'bogus'; not a TrainConfig field"),
        ("epochs=3.5", "--set epochs=3.5: expected an integer, e.g. 10"),
        ("size_crops=big,small", "--set size_crops=big,small: expected integers separated "
                                 "by commas, e.g. 224,96"),
        ("checkpoint_at_start=maybe", "--set checkpoint_at_start=maybe: expected true or false"),
        ("precision=bf8", "--set precision=bf8: expected one of fp32, bf16, fp16"),
        ("budget_s=soon", "--set budget_s=soon: expected a number, e.g. 0.1, or none"),
        ("epochs", "--set 'epochs': write key=value, e.g. --set epochs=10"),
    ],
)
def test_a_bad_key_or_value_names_the_accepted_form(pair: str, message: str) -> None:
    with pytest.raises(ConfigError) as excinfo:
        parse_settings([pair])
    assert str(excinfo.value) == message


def test_client_reports_a_bad_setting_as_a_usage_error() -> None:
    """Exit 2 with the parser's message, and nothing sent (no server at this URL)."""
    result = CliRunner().invoke(client_cli.app, ["--url", "http://127.0.0.1:9", "jobs", "submit",
                                                 "--dataset", "ds_0", "--set", "size_crop=32"])
    assert result.exit_code == 2
    text = " ".join(result.output.replace("│", " ").split())  # typer wraps it in a box
    assert ("--set size_crop=32: unknown key 'size_crop'; did you mean size_crops or n_crops?"
            in text)


def test_the_client_imports_no_torch() -> None:
    """`swav_client.cli` now imports `swav_core.config`, which must stay torch-free: the
    client is a small HTTP tool."""
    code = "import sys, swav_client.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2],
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False"], done.stderr
