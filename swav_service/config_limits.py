"""What a job's config may ask of this deployment: an upper bound on every field that
costs memory, processes, disk or time, each a setting (`SWAV_MAX_*`).

`TrainConfig` checks what makes a config valid anywhere (positive sizes, lists of one
length); these bounds say what one tenant may ask of a shared deployment, and are checked
when a job is submitted (api/planning.py) so that a config the workers could not carry (a
8192 px crop, 5000 loader processes, a step count past the database's integers) is a 422
that names the field, the limit and its setting, not a worker that dies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from swav_core.config import TrainConfig
from swav_service.models import MAX_INTEGER
from swav_service.settings import Settings


@dataclass(frozen=True)
class ConfigLimit:
    """One bound: `measure` of a config may not exceed the setting `setting`."""

    field: str
    setting: str
    what: str  # the measured quantity, as the message names it
    measure: Callable[[TrainConfig, int], int | float]  # (config, total steps) -> value


def checkpoints_written(config: TrainConfig, total_steps: int) -> int:
    """Checkpoints a run of `total_steps` writes, at most (by steps and by epochs)."""
    by_steps = total_steps // config.checkpoint_every_steps if config.checkpoint_every_steps else 0
    epochs = config.epochs
    by_epochs = epochs // config.checkpoint_every_epochs if config.checkpoint_every_epochs else 0
    return by_steps + by_epochs


LIMITS: tuple[ConfigLimit, ...] = (
    ConfigLimit("size_crops", "max_crop_px", "a crop side of {value} px",
                lambda c, _: max(c.size_crops)),
    ConfigLimit("n_crops", "max_crops", "{value} crops per image",
                lambda c, _: sum(c.n_crops)),
    ConfigLimit("n_crops", "max_crop_groups", "{value} crop resolutions",
                lambda c, _: len(c.n_crops)),
    ConfigLimit("batch_size", "max_batch_size", "a batch of {value} images",
                lambda c, _: c.batch_size),
    ConfigLimit("n_prototypes", "max_prototypes", "{value} prototypes",
                lambda c, _: c.n_prototypes),
    ConfigLimit("hidden_mlp", "max_hidden_mlp", "a hidden width of {value}",
                lambda c, _: c.hidden_mlp),
    ConfigLimit("feat_dim", "max_feat_dim", "{value} feature dimensions",
                lambda c, _: c.feat_dim),
    ConfigLimit("queue_length", "max_queue_length", "a queue of {value} features",
                lambda c, _: c.queue_length),
    ConfigLimit("sinkhorn_iterations", "max_sinkhorn_iterations", "{value} iterations",
                lambda c, _: c.sinkhorn_iterations),
    ConfigLimit("num_workers", "max_num_workers", "{value} loader processes per rank",
                lambda c, _: c.num_workers),
    ConfigLimit("keep_last", "max_keep_last", "keeping {value} checkpoints",
                lambda c, _: c.keep_last),
    ConfigLimit("epochs", "max_total_steps", "{value} steps in all (epochs x steps per epoch)",
                lambda _, steps: steps),
    ConfigLimit("checkpoint_every_steps", "max_checkpoints_per_job",
                "{value} checkpoints over the run", checkpoints_written),
)


@dataclass(frozen=True)
class LimitExceeded:
    field: str
    message: str


def limit_value(settings: Settings, limit: ConfigLimit) -> int:
    value = int(getattr(settings, limit.setting))
    return min(value, MAX_INTEGER) if limit.setting == "max_total_steps" else value


def exceeded_limits(
    config: TrainConfig, settings: Settings, num_images: int
) -> list[LimitExceeded]:
    """Each bound `config` exceeds on a dataset of `num_images`, with a message naming the
    field, the value, the limit and the setting that raises it."""
    total_steps = config.epochs * max(1, num_images // config.batch_size)
    out = []
    for limit in LIMITS:
        value, bound = limit.measure(config, total_steps), limit_value(settings, limit)
        if value > bound:
            env = f"SWAV_{limit.setting.upper()}"
            out.append(LimitExceeded(limit.field, (
                f"{limit.what.format(value=value)} is more than this deployment allows "
                f"(at most {bound}; the setting {env})"
            )))
    return out
