"""Versions of the stored config: what changed in each, and how an older one is read.

A `TrainConfig` is stored wherever a run leaves a trace: the job's row, its run folder
(job.json), every checkpoint and every export. Each carries `config_version`; reading a
config of an older version applies the renames made since, so that a checkpoint written
before a rename still loads and resumes, and a job stored then still shows its config.
A config without a version (one written by hand, a request) reads as version 1: the old
names still work, the current ones too. A version newer than this code knows is refused,
with the version named, rather than read wrongly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONFIG_VERSION = 2
"""The version this code writes."""

RENAMED_IN: dict[int, dict[str, str]] = {
    # n_crops, as n_prototypes (the official code's `nmb_` prefix remained on one field).
    2: {"nmb_crops": "n_crops"},
}
"""For each version, the fields it renamed: {old name: new name}."""


def upgraded(stored: Mapping[str, Any]) -> dict[str, Any]:
    """`stored` (a config's fields, of any version up to CONFIG_VERSION) with the names of
    the current version, and `config_version` set to it.

    Raises ValueError for a version this code does not know, or for a field given under
    both its old and its new name.
    """
    fields = dict(stored)
    version = fields.pop("config_version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(f"config_version={version!r} is not a version (1, 2, ...)")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"config_version={version} was written by a newer swav-service; this one reads "
            f"versions up to {CONFIG_VERSION}: upgrade it to read this config"
        )
    return {**renamed(fields, since=version), "config_version": CONFIG_VERSION}


def renamed(fields: Mapping[str, Any], since: int = 1) -> dict[str, Any]:
    """`fields` with each name renamed after version `since` replaced by its current name
    (a request or a `--set` may still use an old name)."""
    out = dict(fields)
    for step in range(since + 1, CONFIG_VERSION + 1):
        for old, new in RENAMED_IN.get(step, {}).items():
            if old not in out:
                continue
            if new in out:
                raise ValueError(
                    f"{old} and {new} are both given: {old} was renamed {new} in config "
                    f"version {step}; give {new} only"
                )
            out[new] = out.pop(old)
    return out


def current_name(name: str) -> str:
    """The name field `name` has now (itself unless it was renamed)."""
    for step in sorted(RENAMED_IN):
        name = RENAMED_IN[step].get(name, name)
    return name
