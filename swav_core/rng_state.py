"""The process's RNG states (torch CPU and CUDA, numpy, python) as checkpoint values.

A checkpoint loads with `torch.load(..., weights_only=True)` (see swav_core.checkpoint),
which accepts only tensors and plain containers of numbers and strings. numpy's state
holds a uint32 array, so it is stored as an int64 tensor and turned back on restore;
python's state is a tuple of ints.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


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
