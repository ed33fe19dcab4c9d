"""SwAV (Caron et al., 2020) as an importable, tested training engine.

The public surface: `TrainConfig` (every hyperparameter), `swav_core.sinkhorn.sinkhorn`
(eq. 3-5), `swav_loss` (eq. 6), `SwAVModel`, `MultiCropTransform`, `FeatureQueue`,
`swav_core.embed.embed` and `swav_core.trainer.train`.
"""

from importlib import import_module
from typing import Any

# Names load on first use (PEP 562), so `swav_core.config` or `swav_core.errors` can be
# imported without torch (the API process validates configs but trains nothing).
# `sinkhorn` and `embed` share their modules' names: import them from those modules.
_EXPORTS = {
    "TrainConfig": "swav_core.config",
    "preset_names": "swav_core.presets",
    "swav_loss": "swav_core.loss",
    "SwAVModel": "swav_core.model",
    "backbone_names": "swav_core.model",
    "create_backbone": "swav_core.model",
    "MultiCropTransform": "swav_core.multicrop",
    "FeatureQueue": "swav_core.queue",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'swav_core' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
