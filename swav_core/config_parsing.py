"""`TrainConfig` values written as text: `--set key=value` (of `swav-train` and `swav jobs
submit`, one parser for both) and durations such as `20m` for `budget_s`.
"""

from __future__ import annotations

import difflib
import re
import types
from collections.abc import Sequence
from typing import Any, Literal, Union, get_args, get_origin

from swav_core.config import SETTABLE_FIELDS, TrainConfig
from swav_core.config_versions import current_name
from swav_core.errors import ConfigError

_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?")


def parse_duration(text: str) -> float:
    """Seconds from `1200`, `90s`, `20m`, `1h30m` or `2h` (a `budget_s` as people write it).

    Raises ValueError naming the accepted forms.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if not match or not any(match.groups()):
        raise ValueError(f"{text!r} is not a duration: give seconds, or e.g. 20m, 1h30m, 90s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = 3600 * hours + 60 * minutes + seconds
    if total <= 0:
        raise ValueError(f"{text!r}: a budget must be more than 0 seconds")
    return total


_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_NONE = frozenset({"none", "null"})
# The accepted forms, as the error messages name them.
_FORMS: dict[Any, str] = {
    bool: "true or false",
    int: "an integer, e.g. 10",
    float: "a number, e.g. 0.1",
}
_LIST_FORMS: dict[Any, str] = {
    int: "integers separated by commas, e.g. 224,96",
    float: "numbers separated by commas, e.g. 0.14,0.05",
}


def parse_settings(pairs: Sequence[str]) -> dict[str, Any]:
    """`TrainConfig` overrides from `key=value` texts (`--set` of `swav-train` and `swav jobs
    submit`), each value read as its field's type.

    `epochs=3` gives 3, `base_lr=0.1` 0.1, `checkpoint_at_start=true` True (also yes/no,
    on/off, 1/0), `size_crops=32,24` (or `[32,24]`) the list [32, 24], `budget_s=none` None
    where the field is optional, and `precision=bf16` the text when it is one of the allowed
    values. Tuples come back as lists so that the dict is JSON as it is (the client sends
    it to the API); `TrainConfig` makes them tuples again. Only the types are checked here:
    ranges and consistency stay with `TrainConfig`, so that the CLI and the API report them
    with the same messages.

    Raises ConfigError naming the key, the value and the accepted form, or, for an unknown
    key, the fields with close names.
    """
    settings: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key:
            raise ConfigError(f"--set {pair!r}: write key=value, e.g. --set epochs=10")
        settings[current_name(key)] = parse_setting(current_name(key), text)
    return settings


def parse_setting(key: str, text: str) -> Any:
    """The value of TrainConfig field `key` written as `text` (see `parse_settings`)."""
    field = TrainConfig.model_fields.get(key) if key in SETTABLE_FIELDS else None
    if field is None:
        close = difflib.get_close_matches(key, SETTABLE_FIELDS, n=3, cutoff=0.6)
        hint = f"did you mean {' or '.join(close)}?" if close else "not a TrainConfig field"
        raise ConfigError(f"--set {key}={text}: unknown key {key!r}; {hint}")
    try:
        return _coerce(field.annotation, text)
    except ValueError as error:
        raise ConfigError(f"--set {key}={text}: expected {error}") from None


def _coerce(annotation: Any, text: str) -> Any:
    """`text` as a value of the type `annotation`; ValueError names the accepted form."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):  # only `X | None` among TrainConfig's fields
        (inner,) = (a for a in args if a is not type(None))
        if text.lower() in _NONE:
            return None
        try:
            return _coerce(inner, text)
        except ValueError as error:
            raise ValueError(f"{error}, or none") from None
    if origin is Literal:
        if text not in args:
            raise ValueError(f"one of {', '.join(map(str, args))}")
        return text
    if origin is tuple:
        item = args[0]
        parts = [p.strip() for p in text.strip("[]()").split(",")] if text.strip("[]() ") else []
        try:
            return [_coerce(item, part) for part in parts]
        except ValueError:
            raise ValueError(_LIST_FORMS[item]) from None
    if annotation is bool:
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise ValueError(_FORMS[bool])
    if annotation in (int, float):
        try:
            return annotation(text)
        except ValueError:
            raise ValueError(_FORMS[annotation]) from None
    return text
