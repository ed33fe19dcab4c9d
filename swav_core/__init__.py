"""SwAV (Caron et al., 2020) as an importable, tested training engine.

The public surface: `TrainConfig` (every hyperparameter), `sinkhorn` (eq. 3-5),
`swav_loss` (eq. 6), `SwAVModel`, `MultiCropTransform`, `FeatureQueue`, `embed`.
"""

from swav_core.config import TrainConfig, preset_names
from swav_core.embed import embed
from swav_core.loss import swav_loss
from swav_core.model import SwAVModel, backbone_names, create_backbone
from swav_core.multicrop import MultiCropTransform
from swav_core.queue import FeatureQueue
from swav_core.sinkhorn import sinkhorn

__all__ = [
    "FeatureQueue",
    "MultiCropTransform",
    "SwAVModel",
    "TrainConfig",
    "backbone_names",
    "create_backbone",
    "embed",
    "preset_names",
    "sinkhorn",
    "swav_loss",
]
