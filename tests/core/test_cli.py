"""The console scripts end to end, as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import torchvision
from safetensors.torch import load_file, save_file
from torch import nn

from swav_core.checkpoint import list_checkpoints, load_checkpoint
from swav_core.embed import embed
from swav_core.exports import load_model
from swav_core.images import load_rgb

BIN = Path(sys.executable).parent


def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)


def test_train_embed_eval(shapes_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    trained = run(BIN / "swav-train", "--preset", "cpu-tiny", "--set", "epochs=1",
                  "--set", "backbone=resnet18", "--data", shapes_dir, "--out", out)
    assert trained.returncode == 0, trained.stderr
    assert (out / "checkpoints" / "final.pt").exists()

    # The backbone export loads strictly into torchvision's resnet18 (fc excluded) and
    # gives the features that embed() gives.
    model, config = load_model(out / "checkpoints" / "final.pt")
    reference = torchvision.models.resnet18()
    reference.fc = nn.Identity()
    reference.load_state_dict(load_file(out / "backbone.safetensors"), strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference.eval()(x), embed(model, x, normalize=False),
                                   atol=1e-5, rtol=1e-5)
    # With the ONNX export, the formats that apply to resnet18 (not timm's).
    assert sorted(p.name for p in out.iterdir() if p.suffix in (".safetensors", ".onnx")) == [
        "backbone.onnx", "backbone.safetensors", "model.safetensors"]
    session = onnxruntime.InferenceSession(str(out / "backbone.onnx"),
                                           providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(["features"], {"images": x.numpy()})[0],
                               embed(model, x, normalize=False).numpy(), atol=1e-4, rtol=0)

    images = sorted((shapes_dir / "disk").glob("*.png"))[:5]
    embedded = run(BIN / "swav-embed", "--checkpoint", out / "model.safetensors", *images,
                   "--out", tmp_path / "e.npy")
    assert embedded.returncode == 0, embedded.stderr
    array = np.load(tmp_path / "e.npy")
    expected = embed(model, [load_rgb(p) for p in images], size=config.size_crops[0])
    np.testing.assert_allclose(array, expected.numpy(), atol=1e-5)

    evaluated = run(BIN / "swav-eval", "--checkpoint", out / "checkpoints" / "final.pt",
                    "--data", shapes_dir)
    assert evaluated.returncode == 0, evaluated.stderr
    report = json.loads(evaluated.stdout)
    assert 0 <= report["knn_top1"] <= 1 and report["n_train"] + report["n_val"] == 128


def test_user_mistakes_print_one_line(shapes_dir: Path, tmp_path: Path) -> None:
    cases = [
        (["--preset", "cpu-tiny", "--set", "n_prototypes=1"], "n_prototypes"),
        (["--preset", "cpu-tiny", "--set", "queue_length=50"], "use queue_length 32 or 64"),
        (["--preset", "cpu-tiny", "--set", "bogus=1"], "bogus"),
        (["--preset", "cpu-tiny", "--data", str(tmp_path / "missing")], "no such folder"),
    ]
    for args, expected in cases:
        if "--data" not in args:
            args = [*args, "--data", str(shapes_dir)]
        result = run(BIN / "swav-train", *args, "--out", tmp_path / "r")
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_train_starts_from_torchvision_weights(shapes_dir: Path, tmp_path: Path) -> None:
    """torchvision's resnet18 state dict, classifier included, starts a resnet18 run: its
    step-0 checkpoint holds those weights; a file of another network is one clear line."""
    torch.manual_seed(3)
    source = torchvision.models.resnet18()
    weights = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, weights)
    out = tmp_path / "run"
    trained = run(BIN / "swav-train", "--preset", "cpu-tiny", "--set", "epochs=1",
                  "--set", "backbone=resnet18", "--set", "checkpoint_at_start=true",
                  "--data", shapes_dir, "--out", out, "--start-weights", weights)
    assert trained.returncode == 0, trained.stderr
    step0 = next(i for i in list_checkpoints(out) if i.step == 0)
    state = load_checkpoint(step0.path)["model"]
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(state[f"backbone.{key}"], value), key
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    loaded = [e for e in events if e["type"] == "start_weights"]
    assert loaded and "without its classifier (fc.bias, fc.weight)" in loaded[0]["loaded"]

    refused = run(BIN / "swav-train", "--preset", "cpu-tiny", "--set", "epochs=1",
                  "--data", shapes_dir, "--out", tmp_path / "other", "--start-weights", weights)
    assert refused.returncode == 2, refused.stderr
    assert "does not fit the job's model" in refused.stderr and "Traceback" not in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
