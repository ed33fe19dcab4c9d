"""`preset: "auto"`: a recipe chosen from the dataset, the machine and the time budget.

`auto_recipe(stats, machine, ranks, budget_s)` is a pure function: the same inputs give
the same `TrainConfig` fields, each with the reason it was chosen. The paper's recipes
(imagenet-800ep, small-batch) are tuned for 1.28 M images of 224 px, 64+ GPUs and days;
run for minutes on thousands of small images they never train their prototypes, never
use their queue and crop 7-pixel patches. The rules here follow from measurements on
real data (bench/quality.py; the figures are in the README):

- Steps matter more than width in a short run: on a CPU the backbone is the widest small
  ResNet that still gets `MIN_EPOCHS` epochs in the budget; on a GPU, torchvision's
  ResNet-18/50 when the images are large enough and the budget allows them.
- Crops follow the images: the global crop is the images' median short side (capped by
  the device, 64 px on a CPU, 224 on a GPU), the small crops about half of it; images
  that are small to begin with get milder scale ranges than ImageNet's (a 5% crop of a
  28 px digit is a 6 px patch that says nothing about the digit).
- About 10 prototypes per class when class folders exist, and at least one per 50 images.
- A small global batch (more steps per second on a CPU) with SGD; LARS only at the
  large batches it was made for. A given backbone without batch norm (ConvNeXt, ViTs)
  gets AdamW, as its authors and DINO train it: with ConvNeXt-atto for 3 min, kNN 0.86
  against 0.77 with the SGD fitted on ResNets on MNIST, 0.90 against 0.69 on ELPV.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from swav_core.backbone_families import has_batch_norm
from swav_core.config import TrainConfig
from swav_core.costs import Machine, epochs_in
from swav_core.crop_fit import fitted_crop_sizes, meta_backbone
from swav_core.image_folder import ImageFolderScan
from swav_core.presets import config_from

# Backbones from the cheapest up, per device; the recipe takes the last that fits.
CPU_BACKBONES = ("small_resnet10_w16", "small_resnet10_w32", "small_resnet10_w64")
GPU_BACKBONES = ("small_resnet18_w64", "resnet18", "resnet50")
# AdamW's learning rate at batch 32 (auto's CPU batch), measured with ConvNeXt-atto for
# 3 min (bench/quality.py --set optimizer=adamw base_lr=...), kNN/linear top-1:
#   MNIST classes 0.86/0.90 at 3e-4, 0.78/0.94 at 1e-3, 0.77/0.86 with SGD;
#   ELPV cell type 0.90/0.98, 0.88/0.97, 0.69/0.76; ELPV defects 0.76/0.80, 0.78/0.80,
#   0.71/0.77.
ADAMW_LR = 3e-4
# Epochs a short run needs before width pays: at equal time on MNIST, w16 x 8 epochs beat
# w32 x 4 epochs (kNN 0.944 against 0.913), so the recipe widens only past this many.
MIN_EPOCHS = 15
CPU_MAX_CROP, GPU_MAX_CROP, MIN_CROP = 64, 224, 24
SMALL_CROP_RATIO = 96 / 224  # the paper's small/global crop sides
# Small crops keep at least this many pixels a side (MNIST, 32 px global crops: kNN
# 0.913 with 24 px small crops, 0.889 with 16).
MIN_SMALL_CROP = 24
# Below this global crop side, the paper's scale ranges crop too hard for a short run
# (MNIST: kNN 0.872 at (0.25, 1)/(0.1, 0.4), 0.913 at (0.4, 1)/(0.2, 0.5), 0.930 at
# (0.5, 1)/(0.3, 0.6); ELPV at 64 px: 0.962 with the paper's, 0.990 with the milder).
PAPER_SCALE_CROP = 128
PAPER_SCALES = ((0.14, 1.0), (0.05, 0.14))
MILD_SCALES = ((0.5, 1.0), (0.3, 0.6))
PROTOTYPES_PER_CLASS, IMAGES_PER_PROTOTYPE = 10, 50
MIN_PROTOTYPES, MAX_PROTOTYPES = 30, 3000
CPU_BATCH_PER_RANK, GPU_BATCH_PER_RANK = 32, 64
# Epochs when no budget is given: 100 at 50 000 images, more for smaller sets (fixed
# compute grows slower than the data), within [30, 400].
REFERENCE_IMAGES, REFERENCE_EPOCHS = 50_000, 100


@dataclass(frozen=True)
class DatasetStats:
    """What the recipe needs to know about a dataset."""

    num_images: int
    num_classes: int | None
    median_short_side: int
    grayscale_fraction: float = 0.0

    @classmethod
    def from_scan(cls, scan: ImageFolderScan) -> DatasetStats:
        sides = [min(w, h) for w, h in scan.dimensions] or [0]
        gray = sum(scan.grayscale) / len(scan.grayscale) if scan.grayscale else 0.0
        classes = len(scan.classes) if scan.classes else None
        return cls(len(scan.files), classes, int(statistics.median(sides)), round(gray, 3))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Recipe:
    """The TrainConfig fields `auto` chose, and why (field name -> reason)."""

    fields: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)

    def config(self, **overrides: Any) -> TrainConfig:
        """The validated config: the recipe, then the user's own fields on top."""
        return TrainConfig.model_validate({**self.fields, **overrides})


class _Choices:
    def __init__(self) -> None:
        self.fields: dict[str, Any] = {}
        self.reasons: dict[str, str] = {}

    def set(self, reason: str, **values: Any) -> None:
        for name, value in values.items():
            self.fields[name] = value
            self.reasons[name] = reason


def _crop_sizes(stats: DatasetStats, machine: Machine) -> tuple[int, int]:
    cap = GPU_MAX_CROP if machine.device == "cuda" else CPU_MAX_CROP
    large = max(MIN_CROP + 4, min(stats.median_short_side, cap))
    small = max(MIN_SMALL_CROP, round(large * SMALL_CROP_RATIO / 4) * 4)
    return large, min(small, large - 4)


def _prototypes(stats: DatasetStats) -> tuple[int, str]:
    by_size = stats.num_images // IMAGES_PER_PROTOTYPE
    if stats.num_classes and PROTOTYPES_PER_CLASS * stats.num_classes >= by_size:
        k = PROTOTYPES_PER_CLASS * stats.num_classes
        why = f"{PROTOTYPES_PER_CLASS} per class for {stats.num_classes} class folders"
    else:
        k = by_size
        why = f"one per {IMAGES_PER_PROTOTYPE} images ({stats.num_images} images)"
        if stats.num_classes:
            why += (f", more than {PROTOTYPES_PER_CLASS} per class: features for finer "
                    f"distinctions than {stats.num_classes} folders (ELPV, 2 folders: kNN "
                    "0.966 with 20 prototypes, 0.990 with 50)")
    k = min(MAX_PROTOTYPES, max(MIN_PROTOTYPES, k))
    return k, f"{why}, within [{MIN_PROTOTYPES}, {MAX_PROTOTYPES}]"


def default_epochs(num_images: int) -> int:
    scaled = REFERENCE_EPOCHS * math.sqrt(REFERENCE_IMAGES / max(1, num_images))
    return int(min(400, max(30, round(scaled))))


def _wants_adamw(given: Mapping[str, Any], crop: int) -> bool:
    """AdamW when asked for, or for a given backbone without batch norm unless another
    optimiser is given (its layers read on the meta device)."""
    if "optimizer" in given:
        return given["optimizer"] == "adamw"
    if "backbone" not in given:
        return False  # auto's own candidates are ResNets
    model = meta_backbone(str(given["backbone"]), crop)
    return not isinstance(model, str) and not has_batch_norm(model)


def auto_recipe(
    stats: DatasetStats,
    machine: Machine,
    ranks: int = 1,
    budget_s: float | None = None,
    given: Mapping[str, Any] | None = None,
) -> Recipe:
    """The TrainConfig fields for `stats` on `ranks` ranks of `machine` within `budget_s`.

    `given` holds fields the user set: the recipe derives from them what depends on
    them (a given backbone or batch is not chosen again; given epochs set the length the
    warm-up and the freeze are shares of), and they win over its own in `Recipe.config`.
    """
    given = dict(given or {})
    c = _Choices()
    gpu = machine.device == "cuda"
    large, small = _crop_sizes(stats, machine)
    why_sizes = (
        f"the images' median short side is {stats.median_short_side} px; global crops at "
        f"most {GPU_MAX_CROP if gpu else CPU_MAX_CROP} px on a {machine.device}, small "
        f"crops about {SMALL_CROP_RATIO:.2f} of that (the paper's 96/224) and at least "
        f"{MIN_SMALL_CROP} px"
    )
    if "backbone" in given and "size_crops" not in given:
        fitted = fitted_crop_sizes(str(given["backbone"]), (large, small))
        if fitted != (large, small):
            why_sizes += (f"; {[large, small]} raised to the nearest sides "
                          f"{given['backbone']} takes")
            large, small = fitted
    c.set(why_sizes, size_crops=(large, small))
    c.set(
        "2 + 6 crops as the paper on a GPU" if gpu else
        "2 + 2 crops on a CPU: 6 small crops cost 1.6x the step for +0.02 kNN (MNIST), "
        "fewer epochs in a budget",
        n_crops=(2, 6 if gpu else 2),
    )
    scales = PAPER_SCALES if large >= PAPER_SCALE_CROP else MILD_SCALES
    c.set(
        "the paper's scale ranges" if scales == PAPER_SCALES else
        f"global crops under {PAPER_SCALE_CROP} px: milder scales than the paper's, which "
        "a short run learns faster from",
        min_scale_crops=(scales[0][0], scales[1][0]),
        max_scale_crops=(scales[0][1], scales[1][1]),
    )
    k, why = _prototypes(stats)
    c.set(why, n_prototypes=k)

    per_rank = GPU_BATCH_PER_RANK if gpu else CPU_BATCH_PER_RANK
    batch = per_rank * ranks
    while batch > max(ranks, stats.num_images // 4) and batch > ranks:
        batch = max(ranks, batch // 2 // ranks * ranks)
    batch = int(given.get("batch_size", batch))
    c.set(
        f"{per_rank} images per rank on {ranks} rank(s): small batches take more steps per "
        "second, which a short run needs more than batch statistics",
        batch_size=batch,
    )
    if _wants_adamw(given, large):
        lr = ADAMW_LR * math.sqrt(batch / 32)
        c.set(
            f"AdamW for {given.get('backbone', 'the backbone')}, which has no batch norm (as "
            "ConvNeXt and ViTs are trained), lr 3e-4 at batch 32 scaled by sqrt(batch / 32) "
            "(the square-root rule for Adam: 1.7e-3 at 1024, near DINO's 2e-3), weight "
            "decay 0.05 (ConvNeXt's, DeiT's)",
            optimizer="adamw", base_lr=round(lr, 6), final_lr=round(lr / 100, 8),
            weight_decay=0.05,
        )
    elif batch >= 1024:
        c.set("LARS at large batch, as the paper", optimizer="lars",
              base_lr=4.8 * batch / 4096, final_lr=0.0048 * batch / 4096)
    else:
        c.set("SGD with momentum below batch 1024, lr scaled linearly from 0.1 at 32",
              optimizer="sgd", base_lr=round(0.1 * batch / 32, 4),
              final_lr=round(0.001 * batch / 32, 6), weight_decay=1e-5)
    c.set("sharper codes than the paper's 0.05 for few prototypes and small batches",
          epsilon=0.03)
    c.set("bf16 where the device runs it natively" if machine.precision != "fp32"
          else "fp32: no native bf16 on this device", precision=machine.precision)
    workers = max(1, min(8, machine.cpu_cores - 1)) if gpu else max(1, machine.cpu_cores // 2)
    c.set(f"{machine.cpu_cores} CPU cores per rank", num_workers=workers)
    c.set("the paper's head on a GPU; on a CPU the small head every measurement here used",
          hidden_mlp=2048 if gpu else 128, feat_dim=128 if gpu else 32)
    if stats.grayscale_fraction >= 0.5:
        c.set(
            f"{stats.grayscale_fraction:.0%} of the images are grayscale: brightness and "
            "contrast are their only colour cues, and the paper's jitter (strength 1) would "
            "erase them (MNIST: kNN 0.86 at 1.0, 0.91 at 0.5)",
            color_jitter_strength=0.5,
        )
    else:
        c.set("colour images: the paper's jitter strength", color_jitter_strength=1.0)

    candidates: tuple[str, ...] = GPU_BACKBONES if gpu else CPU_BACKBONES
    if gpu and large < 160:
        candidates = GPU_BACKBONES[:1]  # ImageNet stems waste small crops
    if "backbone" in given:
        candidates = (str(given["backbone"]),)
    backbone, epochs = candidates[0], None
    for name in candidates:
        trial = Recipe({**c.fields, "backbone": name, "epochs": 1}).config(
            **{k: v for k, v in given.items() if k != "budget_s"}
        )
        fits = (epochs_in(budget_s, trial, stats.num_images, machine, ranks,
                          stats.median_short_side**2) if budget_s else None)
        if fits is None or fits >= MIN_EPOCHS:
            backbone, epochs = name, fits
    if budget_s:
        c.set(
            f"the widest backbone that gets at least {MIN_EPOCHS} epochs in {budget_s:.0f} s "
            f"(about {epochs or 0:.0f} by the estimate)", backbone=backbone
        )
        c.set("fitted to the budget when the run starts", budget_s=budget_s)
        planned = max(1.0, epochs or 1.0)
        c.set("the estimate for the budget; the run fits its own when it starts",
              epochs=max(1, round(planned)))
    else:
        c.set(f"the largest backbone for a {machine.device} without a budget", backbone=backbone)
        planned = float(given.get("epochs", default_epochs(stats.num_images)))
        c.set(f"{REFERENCE_EPOCHS} epochs at {REFERENCE_IMAGES} images, scaled by "
              "sqrt(50 000 / images), within [30, 400]", epochs=int(planned))

    steps = max(1.0, planned * stats.num_images / batch)
    c.set("5% of the run", warmup_epochs=round(0.05 * planned, 3))
    c.set("prototypes frozen for the first 2% of the steps (at least 20), so the "
          "early, random features do not drag them",
          freeze_prototypes=max(20, round(0.02 * steps)), freeze_prototypes_unit="iterations")
    c.set("the queue helps only once features are stable; off for these short runs",
          queue_length=0)
    c.set("a checkpoint per tenth of the run", checkpoint_every_epochs=max(1, round(planned / 10)))
    return Recipe(c.fields, c.reasons)


AUTO = "auto"



def resolve_config(
    preset: str | None,
    overrides: dict[str, Any],
    stats: DatasetStats | None,
    machine: Machine | None,
    ranks: int = 1,
) -> tuple[TrainConfig, dict[str, str]]:
    """The config of a run and the reason for each auto choice ({} for a named preset).

    `preset` None or "auto" takes `auto_recipe` for `stats` on `machine` (the budget is
    `overrides["budget_s"]` when given), then the overrides on top; a named preset goes
    through `config_from`. Raises KeyError for an unknown preset, pydantic's
    ValidationError for bad fields, ValueError when auto lacks its inputs.
    """
    if preset not in (None, AUTO):
        return config_from(preset, **overrides), {}
    if stats is None or machine is None:
        raise ValueError("preset auto needs the dataset's statistics and the machine")
    budget = overrides.get("budget_s")
    recipe = auto_recipe(stats, machine, ranks, float(budget) if budget else None, overrides)
    config = recipe.config(**overrides)
    reasons = {name: why for name, why in recipe.reasons.items() if name not in overrides}
    reasons.update({name: "given in the request" for name in overrides})
    return config, reasons
