"""The trained model in files: safetensors exports, and the model of a checkpoint or export.

Two exports, both written atomically:

- `export_backbone_safetensors`: the backbone without `fc.*`; a torchvision backbone's
  file loads with `strict=True` into `torchvision.models.resnetXX()` whose `fc` is
  `nn.Identity()`, so users need none of this package to use the features.
- `export_model_safetensors`: the whole SwAV model with its `TrainConfig` as JSON in the
  metadata, so `load_model_safetensors` rebuilds it without the training checkpoint.

`load_model` takes either a training checkpoint (.pt, verified and loaded by
swav_core.checkpoint) or a model export (.safetensors) and returns the model in eval mode.
"""

from __future__ import annotations

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
from swav_core.model import SwAVModel

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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

    For a torchvision backbone the file loads with `strict=True` into the matching
    `torchvision.models.resnetXX()` whose `fc` is replaced by `nn.Identity()`.
    `backbone_name` (or `model.backbone_name` if set) is recorded in the metadata.
    """
    name = backbone_name or getattr(model, "backbone_name", None)
    metadata = {"format": "pt"} | ({"backbone": str(name)} if name else {})
    data = safetensors_dumps(_plain_tensors(model.backbone, exclude_prefix="fc."), metadata)
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as exc:
        raise CheckpointError(f"cannot write backbone export {path}: {exc}") from exc


def export_model_safetensors(model: SwAVModel, config: TrainConfig, path: Path) -> None:
    """Save the whole SwAV model with its config (JSON in the metadata), atomically."""
    expected = (config.n_prototypes, config.feat_dim)
    if tuple(model.prototypes.weight.shape) != expected:
        raise ValueError(
            f"model prototypes are {tuple(model.prototypes.weight.shape)} but the config "
            f"gives (n_prototypes, feat_dim)={expected}: pass the config it was built from"
        )
    metadata = {"format": "pt", "swav_config": config.model_dump_json()}
    data = safetensors_dumps(_plain_tensors(model), metadata)
    try:
        atomic_write_bytes(Path(path), data)
    except OSError as exc:
        raise CheckpointError(f"cannot write model export {path}: {exc}") from exc


def _build_model(
    config: TrainConfig, state_dict: dict[str, torch.Tensor], source: str
) -> SwAVModel:
    model = SwAVModel.from_config(config)
    try:
        model.load_state_dict(_strip_wrapper_prefix(state_dict), strict=True)
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
