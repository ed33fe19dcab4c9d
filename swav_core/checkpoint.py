"""Crash-safe training checkpoints, RNG state that survives `weights_only`, safetensors exports.

Layout of a run directory::

    run_dir/checkpoints/step-000001200.pt          torch.save of the training state
    run_dir/checkpoints/step-000001200.pt.sha256   JSON sidecar: sha256, size, step
    run_dir/checkpoints/final.pt (+ .sha256)       the state at the end of training
    run_dir/checkpoints/step-000001200.pt.keep     a pin: pruning leaves this checkpoint

Every file is written to a temporary name in the same folder, fsynced, renamed over its
final name, and the folder is fsynced: a reader sees the old file or the new one, never a
torn one. The sidecar is committed before its checkpoint, so the checkpoint's rename is the
commit point: a crash before it leaves the previous checkpoints as they were (plus an
orphan sidecar or temp file that the next save removes); after it, the checkpoint verifies.
Re-saving an existing name (e.g. `final.pt` twice) has a window in which that name's
sidecar and content disagree; it is then skipped and the previous checkpoint is loaded.

Loading always goes through `torch.load(..., weights_only=True)`: a checkpoint holds only
tensors and plain containers of numbers and strings, never arbitrary pickled objects, so a
tampered file cannot run code. `capture_rng_state` therefore stores numpy's state as a tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_dumps
from torch import nn

from swav_core.atomic import atomic_write_bytes, atomic_writer
from swav_core.config import TrainConfig
from swav_core.errors import CheckpointError
from swav_core.model import SwAVModel

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
FINAL_NAME = "final.pt"
SIDECAR_SUFFIX = ".sha256"
PIN_SUFFIX = ".keep"

_STEP_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_HASH_CHUNK = 1 << 20
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class CheckpointInfo:
    """One checkpoint file as its name and sidecar describe it (not verified).

    `sha256` and `size` come from the sidecar and are None when it is missing or
    unreadable (such a checkpoint never verifies). `step` is None only for a `final.pt`
    without a readable sidecar.
    """

    path: Path
    step: int | None
    sha256: str | None
    size: int | None
    final: bool


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + SIDECAR_SUFFIX)


# --------------------------------------------------------------------------- atomic files


class _HashingWriter:
    """A write-only file wrapper that hashes and counts the bytes on their way to disk."""

    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.size += view.nbytes
        return self._file.write(view)

    def flush(self) -> None:
        self._file.flush()


# --------------------------------------------------------------------------- save / list / load


def _sidecar_bytes(name: str, sha256: str, size: int, step: int) -> bytes:
    record = {"file": name, "sha256": sha256, "size": size, "step": step}
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return None
    return record


def save_checkpoint(
    run_dir: Path, state: dict[str, Any], step: int, keep_last: int, final: bool = False
) -> CheckpointInfo:
    """Write `state` as `checkpoints/step-{step:09d}.pt` (or `final.pt`), then prune.

    The sha256 is computed while the bytes are written and committed in the sidecar
    before the checkpoint's own rename (see the module docstring for why that order).
    Pruning keeps the newest `keep_last` step checkpoints and `final.pt`, and removes
    older ones, orphan sidecars and temp files of dead writers; a failure to prune is
    logged, not raised, since the new checkpoint is already safe.

    Raises CheckpointError naming the reason (e.g. no space left) if the checkpoint cannot
    be written; the previous checkpoints are then untouched and no temp file remains.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    folder = checkpoint_dir(run_dir)
    path = folder / (FINAL_NAME if final else f"step-{step:09d}.pt")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as file:
            writer = _HashingWriter(file)
            torch.save(state, writer)  # type: ignore[arg-type]
            digest, size = writer.sha256.hexdigest(), writer.size
            # the sidecar lands first: a checkpoint is never visible without its digest
            atomic_write_bytes(sidecar_path(path), _sidecar_bytes(path.name, digest, size, step))
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {path.name}: {exc.strerror or exc}; the previous "
            "checkpoints are intact (free space or fix the run folder, then resume)"
        ) from exc
    try:
        _prune(folder, keep_last)
    except OSError as exc:
        logger.warning("could not prune old checkpoints in %s: %s", folder, exc)
    return CheckpointInfo(path=path, step=step, sha256=digest, size=size, final=final)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def pin_path(path: Path) -> Path:
    return path.with_name(path.name + PIN_SUFFIX)


def set_pinned(path: Path, pinned: bool) -> None:
    """Pin a step checkpoint so that pruning keeps it (e.g. the best one by a quality
    metric), or unpin it so that the next prune treats it like any other."""
    if pinned:
        atomic_write_bytes(pin_path(path), b"")
    else:
        pin_path(path).unlink(missing_ok=True)


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Remove step checkpoints (and their sidecars) past the newest `keep_last`, except
    pinned ones. Safe from another process than the trainer: it leaves temp files alone."""
    infos = [info for info in list_checkpoints(run_dir) if not info.final]
    for info in infos[keep_last:]:
        if pin_path(info.path).exists():
            continue
        info.path.unlink(missing_ok=True)
        sidecar_path(info.path).unlink(missing_ok=True)


def _prune(folder: Path, keep_last: int) -> None:
    """`prune_checkpoints`, then the leftovers of interrupted writes: orphan sidecars and
    pins, and temp files of writers no longer alive (the trainer's own save only)."""
    prune_checkpoints(folder.parent, keep_last)
    for entry in folder.iterdir():
        temp = _TEMP_NAME.match(entry.name)
        if temp and int(temp.group(1)) != os.getpid() and not _pid_alive(int(temp.group(1))):
            entry.unlink(missing_ok=True)
        elif entry.name.endswith((SIDECAR_SUFFIX, PIN_SUFFIX)):
            checkpoint = entry.with_name(entry.name.rsplit(".", 1)[0])
            if _is_checkpoint_name(checkpoint.name) and not checkpoint.exists():
                entry.unlink(missing_ok=True)


def _is_checkpoint_name(name: str) -> bool:
    return name == FINAL_NAME or _STEP_NAME.match(name) is not None


def list_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """All checkpoints of `run_dir`, newest first: `final.pt`, then steps descending.

    Reads the sidecars but does not hash the files; temp files are ignored.
    """
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    infos: list[CheckpointInfo] = []
    for entry in folder.iterdir():
        match = _STEP_NAME.match(entry.name)
        if not match and entry.name != FINAL_NAME:
            continue
        record = _read_sidecar(entry) or {}
        step = int(match.group(1)) if match else record.get("step")
        size = record.get("size")
        infos.append(
            CheckpointInfo(
                path=entry,
                step=step if isinstance(step, int) else None,
                sha256=record.get("sha256"),
                size=size if isinstance(size, int) else None,
                final=match is None,
            )
        )
    return sorted(infos, key=lambda i: (i.final, -1 if i.step is None else i.step), reverse=True)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _invalid_reason(path: Path) -> str | None:
    """Why `path` fails verification, or None if its bytes match its sidecar."""
    record = _read_sidecar(path)
    if record is None:
        return f"missing or unreadable sidecar {sidecar_path(path).name}"
    try:
        size = path.stat().st_size
        if isinstance(record.get("size"), int) and size != record["size"]:
            return f"size {size} differs from the recorded {record['size']}"
        actual = file_sha256(path)
    except OSError as exc:
        return f"cannot read it: {exc}"
    if actual != record["sha256"]:
        return f"sha256 {actual} differs from the recorded {record['sha256']}"
    return None


def verify_checkpoint(path: Path) -> bool:
    """True if the file's sha256 matches its sidecar (a missing sidecar is invalid)."""
    return _invalid_reason(Path(path)) is None


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The verified state stored at `path`, loaded with `weights_only=True`.

    Raises CheckpointError if the checksum does not verify or the file does not load
    (including a file that holds anything beyond tensors and plain containers).
    """
    path = Path(path)
    reason = _invalid_reason(path)
    if reason is not None:
        raise CheckpointError(f"checkpoint {path} is invalid: {reason}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    # torch.load of untrusted bytes can fail with many exception types; all mean "unusable".
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} does not load: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


def load_latest_checkpoint(
    run_dir: Path, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any], CheckpointInfo] | None:
    """The newest checkpoint that verifies and loads, with its info; None if there are none.

    Invalid ones are skipped with a warning on this module's logger. Raises CheckpointError
    if checkpoints exist but none is usable: restarting from scratch silently would
    throw the run's progress away.
    """
    infos = list_checkpoints(run_dir)
    for info in infos:
        try:
            return load_checkpoint(info.path, map_location), info
        except CheckpointError as exc:
            logger.warning("skipping checkpoint: %s", exc)
    if infos:
        raise CheckpointError(
            f"none of the {len(infos)} checkpoints in {checkpoint_dir(run_dir)} is usable"
        )
    return None


# --------------------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states, as `weights_only`-safe values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    py_version, py_internal, py_gauss = random.getstate()
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.get_rng_state_all()
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "numpy": (
            str(np_name),
            torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            int(np_pos),
            int(np_has_gauss),
            float(np_gauss),
        ),
        "python": (int(py_version), [int(x) for x in py_internal], py_gauss),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`; CUDA states are restored when the device count matches."""
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda") or []
    if cuda:
        if torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all([s.cpu() for s in cuda])
        else:
            logger.warning(
                "not restoring %d CUDA RNG states: %d CUDA devices here",
                len(cuda),
                torch.cuda.device_count() if torch.cuda.is_available() else 0,
            )
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    keys = np.asarray(torch.as_tensor(np_keys).cpu().numpy(), dtype=np.uint32)
    np.random.set_state((np_name, keys, int(np_pos), int(np_has_gauss), float(np_gauss)))
    py_version, py_internal, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(x) for x in py_internal), py_gauss))


# --------------------------------------------------------------------------- exports


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
