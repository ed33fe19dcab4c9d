"""The backbone as an ONNX graph: images (N x 3 x S x S, float32) -> features (N x F).

Runs in onnxruntime (or any ONNX runtime) without PyTorch or this package:

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    features = session.run(["features"], {"images": images})[0]

The batch axis is dynamic, the side S is fixed: the job's largest crop (`size_crops[0]`),
recorded with the backbone's name, the exporter and the opset in the model's metadata
(`onnx.load(path).metadata_props`). The backbone is exported in eval mode (batch-norm
running statistics, no dropout), so its output equals `embed(..., layer="backbone",
normalize=False)` up to float rounding (tests/core/test_export_formats.py: 1e-4).

The exporter: torch's TorchScript exporter (`dynamo=False`) first, then the torch.export
one (`dynamo=True`) when that fails or is gone. Both give the same numbers for the
backbones we test (ResNets, ConvNeXt, EfficientNets, ViTs at a resampled grid), and the
first takes about a second where the second takes five to ten on a CPU; the export is made
inside an HTTP request on first download. The TorchScript exporter is deprecated since
torch 2.9: when torch drops it, every export goes the dynamo way, unchanged for users.
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from swav_core.atomic import atomic_write_bytes
from swav_core.errors import CheckpointError

OPSET = 20
"""The ONNX opset of our exports (onnxruntime >= 1.16 runs it)."""

INPUT_NAME = "images"
OUTPUT_NAME = "features"
Exporter = Literal["auto", "torchscript", "dynamo"]


class OnnxExportError(CheckpointError):
    """Neither exporter of torch handles the backbone (its message holds their reasons)."""

    code = "export_unsupported"


def _export(backbone: nn.Module, example: torch.Tensor, target: Path, dynamo: bool) -> None:
    # Both exporters print progress and warn about tracing; neither is news to the caller.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(
                backbone, (example,), str(target), dynamo=True, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: "batch"},), external_data=False,
            )  # fmt: skip
        else:
            torch.onnx.export(
                backbone, (example,), str(target), dynamo=False, opset_version=OPSET,
                input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            )  # fmt: skip


def export_backbone_onnx(
    backbone: nn.Module,
    path: Path,
    image_size: int,
    backbone_name: str,
    exporter: Exporter = "auto",
) -> str:
    """Write `backbone` (eval mode, on CPU, float32) as ONNX to `path` atomically; return
    the exporter used ('torchscript' or 'dynamo'). The module is left as it was."""
    import onnx

    was_training = backbone.training
    device = next(backbone.parameters()).device
    dtype = next(backbone.parameters()).dtype
    backbone.to("cpu", torch.float32).eval()
    example = torch.zeros(2, 3, image_size, image_size)
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    errors: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix=".onnx-", dir=Path(path).parent) as folder:
            target = Path(folder) / "backbone.onnx"
            for name in order:
                try:
                    _export(backbone, example, target, dynamo=name == "dynamo")
                    break
                except Exception as exc:  # noqa: BLE001 (either exporter raises anything)
                    errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
            else:
                raise OnnxExportError(
                    f"backbone {backbone_name} cannot be exported to ONNX ({'; '.join(errors)})"
                )
            model = onnx.load(str(target))
    except OSError as exc:  # the scratch folder beside `path` cannot be written
        raise CheckpointError(f"cannot write ONNX export {path}: {exc}") from exc
    finally:
        backbone.to(device, dtype).train(was_training)
    used = name
    metadata = {
        "backbone": backbone_name,
        "image_size": str(image_size),
        "exporter": used,
        "opset": str(OPSET),
    }
    for key, value in metadata.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=key, value=value))
    try:
        atomic_write_bytes(Path(path), model.SerializeToString())
    except (OSError, ValueError) as exc:  # ValueError: a model over protobuf's 2 GB
        raise CheckpointError(f"cannot write ONNX export {path}: {exc}") from exc
    return used
