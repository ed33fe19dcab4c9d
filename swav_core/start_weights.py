"""Starting weights: a fresh model initialised from an earlier run or from a weights file.

`load_start_weights(model, path)` takes, before step 0:

- a training checkpoint (.pt, verified by swav_core.checkpoint) or a whole-model export
  (.safetensors with 'swav_config' metadata, swav_core.exports): the whole model
  (backbone, projection head, prototypes) when its backbone and head shapes match the
  job's, else only its backbone when that matches, and says so;
- a plain safetensors state dict of the backbone (our backbone export, or torchvision /
  timm weights): loaded into `model.backbone`, dropping only the classifier keys that our
  headless backbone lacks (`fc.*`, `head.*`, `classifier.*`).

Every load is strict otherwise: a missing, unexpected or differently shaped tensor raises
InvalidWeightsError naming the first few and how to fix it. Files are read with
`torch.load(weights_only=True)` (through load_checkpoint) or safetensors only, so a
tampered file cannot run code; nothing is ever downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from swav_core.checkpoint import load_checkpoint
from swav_core.errors import CheckpointError, InvalidWeightsError
from swav_core.exports import strip_wrapper_prefix
from swav_core.model import SwAVModel

CLASSIFIER_PREFIXES = ("fc.", "head.", "classifier.", "head.fc.")
_SHOWN = 5  # keys named in an error message


def _shown(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def mismatches(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """What keeps `state` from loading strictly into `module`: missing and unexpected keys
    (the first few of each) and shape mismatches; empty when it loads."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{key} is {tuple(state[key].shape)}, the model's is {expected[key]}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != expected[key]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys: {_shown(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_shown(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_shown(shapes)}")
    return problems


def _load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str, fix: str) -> None:
    problems = mismatches(module, state)
    if problems:
        problem = "; ".join(problems)
        raise InvalidWeightsError(f"{what} does not fit the job's model: {problem}; {fix}")
    module.load_state_dict(state, strict=True)


def _read_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The file's tensors and, for a training checkpoint or model export, its config."""
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as file:
                metadata = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
        # safetensors raises its own SafetensorError (and OSError) on unreadable files.
        except Exception as exc:
            raise InvalidWeightsError(
                f"the start weights {path.name} are not a readable safetensors file ({exc}); "
                "upload a .safetensors state dict"
            ) from exc
        if "swav_config" not in metadata:
            return tensors, None
        try:
            config = json.loads(metadata["swav_config"])
        except ValueError as exc:
            raise InvalidWeightsError(f"{path.name} holds an unreadable swav_config") from exc
        return tensors, config if isinstance(config, dict) else None
    try:
        state = load_checkpoint(path)
    except CheckpointError as exc:
        raise InvalidWeightsError(
            f"the start checkpoint {path.name} cannot be used: {exc}; start from a "
            "checkpoint that is still available"
        ) from exc
    model_state, config = state.get("model"), state.get("config")
    if not isinstance(model_state, dict) or not isinstance(config, dict):
        raise InvalidWeightsError(
            f"the start checkpoint {path.name} has no 'model' and 'config': not a training "
            "checkpoint"
        )
    return dict(model_state), config


def load_start_weights(model: SwAVModel, path: Path) -> str:
    """Load the weights in `path` into the freshly built `model`; what was loaded, in words.

    Raises InvalidWeightsError (code `invalid_weights`) if the file is missing, unreadable
    or does not fit the model (see the module docstring for what fits).
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidWeightsError(
            f"the start weights {path.name} are gone (a pruned checkpoint or deleted weights); "
            "start from weights that still exist"
        )
    tensors, config = _read_file(path)
    tensors = strip_wrapper_prefix(tensors)
    ours = model.backbone_name
    if config is not None:
        theirs = config.get("backbone")
        if theirs != ours:
            raise InvalidWeightsError(
                f"the start weights {path.name} were trained with backbone {theirs!r}, the "
                f"job uses {ours!r}; set config.backbone to {theirs!r} or start from "
                f"weights of a {ours!r}"
            )
        if not mismatches(model, tensors):
            model.load_state_dict(tensors, strict=True)
            return f"the whole model ({ours}, projection head and prototypes) from {path.name}"
        backbone = {
            key.removeprefix("backbone."): value
            for key, value in tensors.items()
            if key.startswith("backbone.")
        }
        _load_strict(
            model.backbone, backbone, f"the backbone of {path.name}",
            "use the same backbone settings as the run it comes from",
        )
        return (
            f"the backbone ({ours}) from {path.name}; its projection head and prototypes "
            "differ in shape from the job's (hidden_mlp, feat_dim or n_prototypes), so "
            "those start fresh"
        )
    own_keys = set(model.backbone.state_dict())
    dropped = sorted(
        key for key in tensors if key not in own_keys and key.startswith(CLASSIFIER_PREFIXES)
    )
    backbone = {key: value for key, value in tensors.items() if key not in dropped}
    _load_strict(
        model.backbone, backbone, f"the backbone weights {path.name}",
        f"upload a state dict of a {ours!r} backbone (the keys of its state_dict()), or set "
        "config.backbone to the network the file holds",
    )
    note = f", without its classifier ({_shown(dropped)})" if dropped else ""
    return f"the backbone ({ours}) from {path.name}{note}"
