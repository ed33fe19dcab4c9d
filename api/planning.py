"""How a job's config is resolved at submit: a named preset, or `auto` for its dataset on
the workers that would run it, with the estimates that `dry_run` answers.

`auto` needs the dataset's statistics (recorded at ingestion) and the machine: the live
training workers that can run the job's ranks report a measured profile in their
heartbeat (worker/resources.py). The recipe is chosen for the slowest of them, so that a
budget holds wherever the job lands; with none alive, for `unknown_machine()`, a modest
CPU, and the reasons say so.

swav_core.costs and swav_core.recipe import torch (FLOPs are counted on its meta device),
so they are imported when a job is first planned, not when the API is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.errors import ApiError, validation_error
from swav_core.config import TrainConfig
from swav_core.presets import preset_names
from swav_service.config_limits import exceeded_limits
from swav_service.models import Dataset, Worker, utcnow
from swav_service.settings import Settings

if TYPE_CHECKING:
    from swav_core.costs import Machine
    from swav_core.recipe import DatasetStats

# A worker counts as live when seen within this many heartbeats.
LIVE_HEARTBEATS = 3


@lru_cache(maxsize=1)
def unknown_machine() -> Machine:
    """Assumed when no live worker has reported a profile: two CPU cores, fp32, at the pace
    this project's 2-core CI machine measures in fp32 (bench/quality.py prints it)."""
    from swav_core.costs import Machine

    return Machine(device="cpu", gflops=100.0, precision="fp32", cpu_cores=2,
                   name="unknown (no live worker reported a profile)")


@dataclass(frozen=True)
class Plan:
    preset: str  # what the job records: the preset asked for, or auto
    config: TrainConfig
    reasons: dict[str, str]
    machines: list[tuple[Machine, int]]  # each kind of live worker that fits, and how many
    stats: DatasetStats | None


def dataset_stats(dataset: Dataset) -> DatasetStats:
    """The recorded statistics; for a dataset ingested before they were recorded, what the
    row knows (image sizes unknown: taken as 224 px)."""
    from swav_core.recipe import DatasetStats

    if dataset.stats:
        return DatasetStats(**dataset.stats)
    classes = len(dataset.classes) if dataset.classes else None
    return DatasetStats(dataset.num_images or 0, classes, 224)


def live_machines(session: Session, settings: Settings, ranks: int) -> list[tuple[Machine, int]]:
    """The distinct machine profiles of live training workers that can run `ranks` ranks
    per node, with how many workers report each, slowest first."""
    from swav_core.costs import Machine

    since = utcnow() - timedelta(seconds=LIVE_HEARTBEATS * settings.worker_heartbeat_s)
    counts: dict[Machine, int] = {}
    for worker in session.scalars(select(Worker).where(Worker.last_seen_at >= since)):
        resources = worker.resources or {}
        profile = resources.get("machine")
        queues = worker.queues.split(",")
        if not profile or settings.train_queue not in queues or resources.get("ranks", 0) < ranks:
            continue
        try:
            machine = Machine(**profile)
        except TypeError:
            continue
        counts[machine] = counts.get(machine, 0) + 1
    return sorted(counts.items(), key=lambda item: item[0].gflops)


def plan_job(
    session: Session,
    settings: Settings,
    dataset: Dataset,
    preset: str | None,
    overrides: dict[str, Any],
    gpus: int,
    nodes: int,
) -> Plan:
    """The job's config and the reasons of auto's choices, or ApiError 422 naming the field."""
    from swav_core.crop_fit import crop_size_problem
    from swav_core.errors import ConfigError
    from swav_core.recipe import AUTO, resolve_config

    machines = live_machines(session, settings, gpus)
    machine = machines[0][0] if machines else unknown_machine()
    stats = dataset_stats(dataset) if preset in (None, AUTO) else None
    try:
        config, reasons = resolve_config(preset, overrides, stats, machine, gpus * nodes)
    except KeyError as exc:  # only an unknown preset: validation errors are ValidationError
        raise ApiError(
            422,
            "invalid_config",
            f"preset: unknown preset {preset!r}; use auto (the default: chosen from the "
            f"dataset and the workers) or one of {', '.join(preset_names())}",
            "preset",
        ) from exc
    except ValidationError as exc:
        raise validation_error(exc.errors(), prefix="config", code="invalid_config") from exc
    except ConfigError as exc:  # auto found no crop sides the given backbone takes
        raise ApiError(422, "invalid_config", f"config.size_crops: {exc}",
                       "config.size_crops") from exc
    problem = crop_size_problem(config.backbone, config.size_crops)
    if problem is not None:
        raise ApiError(422, "invalid_config", f"config.size_crops: {problem}",
                       "config.size_crops")
    over = exceeded_limits(config, settings, dataset.num_images or 0)
    if over:
        field = f"config.{over[0].field}"
        raise ApiError(422, "invalid_config", f"{field}: {over[0].message}", field)
    if stats is not None and not machines:
        reasons["machine"] = (
            f"no live training worker reported a profile; assumed {machine.name}: "
            f"{machine.device}, {machine.gflops:g} GFLOP/s"
        )
    return Plan(preset or AUTO, config, reasons, machines, stats)


def estimates(plan: Plan, num_images: int, ranks: int) -> list[dict[str, Any]]:
    """Time per epoch, total time and peak memory per rank on each kind of live worker
    that fits (or on the assumed machine when none is live)."""
    from swav_core.costs import estimate

    machines = plan.machines or [(unknown_machine(), 0)]
    out = []
    side = plan.stats.median_short_side if plan.stats else 224
    for machine, workers in machines:
        cost = estimate(plan.config, num_images, machine, ranks, side * side)
        fits = machine.memory_gib is None or cost.peak_memory_gib <= machine.memory_gib
        out.append({**cost.as_dict(), "workers": workers, "device": machine.device,
                    "machine_gflops": machine.gflops, "fits_memory": fits})
    return out
