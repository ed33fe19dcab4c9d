"""Crash-safe training checkpoints: atomic saves with sha256 sidecars, verified loads, pruning.

The files' names (a checkpoint, its sidecar, final.pt, pins) are in
swav_core/checkpoint_names.py, which the service shares without importing torch.

Every file is written to a temporary name in the same folder, fsynced, renamed over its
final name, and the folder is fsynced: a reader sees the old file or the new one, never a
torn one. The sidecar is committed before its checkpoint, so the checkpoint's rename is the
commit point: a crash before it leaves the previous checkpoints as they were (plus an
orphan sidecar or temp file that the next save removes); after it, the checkpoint verifies.
Re-saving an existing name (e.g. `final.pt` twice) has a window in which that name's
sidecar and content disagree; it is then skipped and the previous checkpoint is loaded.

Loading always goes through `torch.load(..., weights_only=True)`: a checkpoint holds only
tensors and plain containers of numbers and strings, never arbitrary pickled objects, so a
tampered file cannot run code (swav_core.rng_state stores the RNG states accordingly).
swav_core.training_state decides what a training checkpoint holds; swav_core.exports
writes the model exports and rebuilds a model from a checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from swav_core.atomic import atomic_write_bytes, atomic_writer
from swav_core.checkpoint_names import (
    FINAL_NAME,
    PIN_SUFFIX,
    beside_paths,
    checkpoint_dir,
    checkpoint_of,
    sidecar_path,
)
from swav_core.errors import CheckpointError

logger = logging.getLogger(__name__)

_STEP_NAME = re.compile(r"^step-(\d+)\.pt$")
_TEMP_NAME = re.compile(r"^\..+\.tmp-(\d+)-[0-9a-f]+$")
_HASH_CHUNK = 1 << 20


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
    """Remove step checkpoints (with their sidecars and exports) past the newest
    `keep_last`, except pinned ones. Safe from another process than the trainer: it leaves
    temp files alone."""
    infos = [info for info in list_checkpoints(run_dir) if not info.final]
    for info in infos[keep_last:]:
        if not pin_path(info.path).exists():
            remove_checkpoint(info.path)


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint with the files beside it (sidecar, exports); its pin stays."""
    path.unlink(missing_ok=True)
    for beside in beside_paths(path):
        beside.unlink(missing_ok=True)


def _prune(folder: Path, keep_last: int) -> None:
    """`prune_checkpoints`, then the leftovers of interrupted writes: orphan sidecars, pins
    and exports (an export finished after its checkpoint was pruned), and temp files of
    writers no longer alive (the trainer's own save only)."""
    prune_checkpoints(folder.parent, keep_last)
    for entry in folder.iterdir():
        if _is_dead_temp(entry) or _is_orphan(entry):
            entry.unlink(missing_ok=True)


def _is_dead_temp(entry: Path) -> bool:
    """A temp file whose writer (another process) is gone."""
    temp = _TEMP_NAME.match(entry.name)
    if temp is None:
        return False
    pid = int(temp.group(1))
    return pid != os.getpid() and not _pid_alive(pid)


def _is_orphan(entry: Path) -> bool:
    """A sidecar, pin or export whose checkpoint is gone."""
    checkpoint = checkpoint_of(entry)
    if checkpoint is None or not _is_checkpoint_name(checkpoint.name):
        return False
    return not checkpoint.exists()


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
