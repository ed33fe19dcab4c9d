"""The backbones a config may name, without importing torch: the API checks a job's
`backbone` at submit from this list, and swav_core/model.py builds each of them.
"""

from __future__ import annotations

TORCHVISION_RESNETS = (
    "resnet18", "resnet34", "resnet50", "resnet101", "wide_resnet50_2", "wide_resnet101_2",
)
"""torchvision's ResNets, randomly initialised (no weights are downloaded)."""

SMALL_RESNET_BLOCKS = {10: (1, 1, 1, 1), 18: (2, 2, 2, 2)}
SMALL_RESNET_WIDTHS = (16, 32, 64)
SMALL_RESNETS = {
    f"small_resnet{depth}_w{width}": (width, blocks)
    for depth, blocks in SMALL_RESNET_BLOCKS.items()
    for width in SMALL_RESNET_WIDTHS
}
"""ResNets for small images and CPU budgets: name -> (width, blocks per stage)."""

BACKBONES: tuple[str, ...] = tuple(sorted(("tiny_cnn", *TORCHVISION_RESNETS, *SMALL_RESNETS)))
