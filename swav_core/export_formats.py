"""Which download formats a checkpoint offers, by its backbone, without importing torch.

The API answers `GET /v1/checkpoints/{id}/download?format=` and lists a checkpoint's
formats with this, and imports torch only when it makes an export. Each format is a file
that loads where its users work, with none of this package:

- `full`: the training checkpoint (.pt), `torch.load(path, weights_only=True)`.
- `safetensors`: the whole SwAV model, its config in the metadata (swav_core.exports).
- `backbone`: our own and torchvision backbones' state dict, for a strict
  `load_state_dict` into the torchvision model whose classifier is an `nn.Identity()`.
- `timm`: a timm backbone's state dict, for `timm.create_model(..., checkpoint_path=...)`.
- `onnx`: the backbone as an ONNX graph, images (N x 3 x S x S) -> features (N x F).
"""

from __future__ import annotations

from swav_core.backbone_names import split_family

FORMATS = ("full", "safetensors", "backbone", "timm", "onnx")
"""Every download format, in the order they are listed."""

EXPORT_SUFFIX = {
    "safetensors": ".model.safetensors",
    "backbone": ".backbone.safetensors",
    "timm": ".timm.safetensors",  # timm's loader reads safetensors by this suffix
    "onnx": ".onnx",
}
"""The suffix of each export, beside the checkpoint (`step-000000008.onnx`)."""


def export_formats(backbone: str) -> tuple[str, ...]:
    """The formats a checkpoint of `backbone` downloads in: `timm` for `timm/<name>`,
    `backbone` for the others (ours and `torchvision/<name>`), and the rest for all."""
    family, _ = split_family(backbone)
    kind = "timm" if family == "timm" else "backbone"
    return tuple(f for f in FORMATS if f in ("full", "safetensors", "onnx", kind))


def format_problem(backbone: str, fmt: str) -> str | None:
    """Why `fmt` does not apply to a checkpoint of `backbone` (naming those that do), or
    None when it does."""
    formats = export_formats(backbone)
    if fmt in formats:
        return None
    why = (
        "a timm backbone downloads as 'timm' (for timm.create_model(checkpoint_path=...))"
        if fmt == "backbone"
        else "only timm backbones download as 'timm'"
        if fmt == "timm"
        else f"unknown format {fmt!r}"
    )
    return f"format {fmt!r} does not apply to backbone {backbone!r}: {why}; use one of " + (
        ", ".join(formats)
    )
