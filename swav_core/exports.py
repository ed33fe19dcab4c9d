"""The trained model in files: safetensors and ONNX exports, and the model of a
checkpoint or export.

The exports, all written atomically, each loading where its users work (the formats that
apply to a backbone: swav_core/export_formats.py):

- `export_backbone_safetensors`: the backbone's state dict; a torchvision backbone's file
  loads with `strict=True` into the torchvision model whose last classifier Linear is
  `nn.Identity()` (`resnet18`: `model.fc`; `torchvision/efficientnet_b0`:
  `model.classifier[1]`), so users need none of this package to use the features.
- `export_timm_safetensors`: a `timm/<name>` backbone's state dict, for timm's own strict
  loader: `timm.create_model(name, pretrained=False, num_classes=0, checkpoint_path=path)`,
  plus `img_size=S, dynamic_img_size=True` for the models that take them (ViTs).
- `export_backbone_onnx` (swav_core/onnx_export.py): the backbone as an ONNX graph.
- `export_model_safetensors`: the whole SwAV model with its `TrainConfig` as JSON in the
  metadata, so `load_model_safetensors` rebuilds it without the training checkpoint.
`write_export` writes any of them by format name.

`load_model` takes either a training checkpoint (.pt, verified and loaded by
swav_core.checkpoint) or a model export (.safetensors) and returns the model in eval mode.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_dumps
from torch import nn

from swav_core.atomic import atomic_write_bytes
from swav_core.checkpoint import load_checkpoint
from swav_core.config import TrainConfig
from swav_core.errors import CheckpointError
from swav_core.export_formats import EXPORT_SUFFIX, format_problem
from swav_core.model import SwAVModel
from swav_core.onnx_export import export_backbone_onnx

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a DDP (`module.`) or torch.compile (`_orig_mod.`) prefix shared by every key."""
    for prefix in _WRAPPER_PREFIXES:
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
    return state_dict


def _plain_tensors(module: nn.Module, exclude_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """CPU, contiguous, unshared copies of `module`'s state, as safetensors requires."""
    return {
        key: value.detach().to("cpu", copy=True).contiguous()
        for key, value in module.state_dict().items()
        if exclude_prefix is None or not key.startswith(exclude_prefix)
    }


def export_backbone_safetensors(
    model: SwAVModel, path: Path, backbone_name: str | None = None
) -> None:
    """Save the backbone's weights (without `fc.*`) as safetensors, atomically.

    For a torchvision backbone (`resnet18`, `torchvision/<name>`) the file loads with
    `strict=True` into `torchvision.models.get_model(name, weights=None)` whose last
    `nn.Linear` (in `named_modules()` order) is replaced by `nn.Identity()`: `model.fc`
    for the ResNets, `model.classifier[1]` for efficientnet_b0, `model.heads.head` for
    vit_b_16. `backbone_name` (or `model.backbone_name` if set) is in the metadata.
    """
    name = backbone_name or getattr(model, "backbone_name", None)
    metadata = {"format": "pt"} | ({"backbone": str(name)} if name else {})
    # The Identity that replaced the classifier holds no keys, so nothing is dropped but
    # an `fc` of our own names (older models kept one); a torchvision/<name> model keeps all.
    own = "/" not in str(name or "")
    data = safetensors_dumps(
        _plain_tensors(model.backbone, exclude_prefix="fc." if own else None), metadata
    )
    _write(path, data, "backbone export")


def export_timm_safetensors(model: SwAVModel, path: Path, image_size: int) -> None:
    """Save a `timm/<name>` backbone's state dict for timm's own (strict) loader, atomically.

    Load it with `timm.create_model(name, pretrained=False, num_classes=0,
    checkpoint_path=path, **json.loads(metadata["timm_kwargs"]))`: the kwargs are
    `{"img_size": S, "dynamic_img_size": true}` for the models built with a patch grid
    (ViTs and the others that accept them; S is the job's `size_crops[0]`), as training
    built them, and `{}` for the rest (CNNs). The metadata (`safetensors.safe_open(path,
    "pt").metadata()`) also holds `timm_model` (the name). `path` must end in
    `.safetensors`: timm picks its reader by the suffix.
    """
    family, _, timm_name = model.backbone_name.partition("/")
    if family != "timm" or not timm_name:
        raise ValueError(f"backbone {model.backbone_name!r} is not a timm/<name> backbone")
    if Path(path).suffix != ".safetensors":
        raise ValueError(f"{path}: timm reads safetensors only from a '.safetensors' path")
    metadata = {
        "format": "pt",
        "backbone": model.backbone_name,
        "timm_model": timm_name,
        "timm_kwargs": json.dumps(
            {"img_size": image_size, "dynamic_img_size": True}
            if getattr(model.backbone, "dynamic_img_size", None) is True
            else {}
        ),
    }
    _write(path, safetensors_dumps(_plain_tensors(model.backbone), metadata), "timm export")


def _write(path: Path, data: bytes, what: str) -> None:
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as exc:
        raise CheckpointError(f"cannot write {what} {path}: {exc}") from exc


def write_export(model: SwAVModel, config: TrainConfig, fmt: str, path: Path) -> None:
    """Write `model`'s export in format `fmt` (a key of `EXPORT_SUFFIX`) to `path`; a
    ValueError names the formats that apply when `fmt` does not."""
    problem = format_problem(config.backbone, fmt)
    if problem is not None or fmt not in EXPORT_SUFFIX:
        raise ValueError(problem or f"format {fmt!r} is the checkpoint itself, not an export")
    if fmt == "safetensors":
        export_model_safetensors(model, config, path)
    elif fmt == "backbone":
        export_backbone_safetensors(model, path, config.backbone)
    elif fmt == "timm":
        export_timm_safetensors(model, path, config.size_crops[0])
    else:
        export_backbone_onnx(model.backbone, path, config.size_crops[0], config.backbone)


def export_model_safetensors(model: SwAVModel, config: TrainConfig, path: Path) -> None:
    """Save the whole SwAV model with its config (JSON in the metadata), atomically."""
    expected = (config.n_prototypes, config.feat_dim)
    if tuple(model.prototypes.weight.shape) != expected:
        raise ValueError(
            f"model prototypes are {tuple(model.prototypes.weight.shape)} but the config "
            f"gives (n_prototypes, feat_dim)={expected}: pass the config it was built from"
        )
    metadata = {"format": "pt", "swav_config": config.model_dump_json()}
    _write(path, safetensors_dumps(_plain_tensors(model), metadata), "model export")


def _build_model(
    config: TrainConfig, state_dict: dict[str, torch.Tensor], source: str
) -> SwAVModel:
    model = SwAVModel.from_config(config)
    try:
        model.load_state_dict(strip_wrapper_prefix(state_dict), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source} does not match its config: {exc}") from exc
    return model.eval()


def load_model_safetensors(path: Path) -> tuple[SwAVModel, TrainConfig]:
    """The model and config saved by `export_model_safetensors` (model in eval mode)."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            keys = file.keys()
            state_dict = {key: file.get_tensor(key) for key in keys}
    # safetensors raises its own SafetensorError (and OSError) on unreadable files.
    except Exception as exc:
        raise CheckpointError(f"cannot read model export {path}: {exc}") from exc
    if "swav_config" not in metadata:
        raise CheckpointError(
            f"{path} has no 'swav_config' metadata: not written by export_model_safetensors "
            "(a backbone-only export loads into torchvision instead)"
        )
    try:
        config = TrainConfig.model_validate_json(metadata["swav_config"])
    except ValueError as exc:
        raise CheckpointError(f"{path} holds an invalid config: {exc}") from exc
    return _build_model(config, state_dict, str(path)), config


def model_from_checkpoint(state: dict[str, Any]) -> tuple[SwAVModel, TrainConfig]:
    """The model and config of a training checkpoint state (keys 'model' and 'config').

    'config' is `config.model_dump(mode="json")`; a `module.` prefix on the model keys
    (a DDP-wrapped state_dict) is stripped. The model is returned in eval mode.
    """
    if "model" not in state or "config" not in state:
        raise CheckpointError(
            f"checkpoint state has keys {sorted(state)}; 'model' and 'config' are required"
        )
    try:
        config = TrainConfig.model_validate(state["config"])
    except ValueError as exc:
        raise CheckpointError(f"checkpoint holds an invalid config: {exc}") from exc
    return _build_model(config, dict(state["model"]), "checkpoint model state"), config


def load_model(path: Path) -> tuple[SwAVModel, TrainConfig]:
    """The model and config in a training checkpoint (.pt) or a model export (.safetensors)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.suffix == ".safetensors":
        return load_model_safetensors(path)
    return model_from_checkpoint(load_checkpoint(path))
