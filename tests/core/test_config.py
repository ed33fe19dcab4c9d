"""`TrainConfig` validation messages, presets and the paper's defaults."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from swav_core.config import TrainConfig
from swav_core.presets import config_from, preset_names
from tests.core.conftest import assert_unknown_name_lists_known


def single_error(**kwargs: Any) -> tuple[dict[str, Any], str]:
    """The one error of TrainConfig(**kwargs), and the exception's full text."""
    with pytest.raises(ValidationError) as excinfo:
        TrainConfig(**kwargs)
    errors = excinfo.value.errors()
    assert len(errors) == 1, errors
    return errors[0], str(excinfo.value)


# --------------------------------------------------------------------------- custom messages


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("size_crops", (224, 96, 64)),
        ("min_scale_crops", (0.14,)),
        ("max_scale_crops", (1.0, 0.14, 0.1)),
    ],
)
def test_mismatched_crop_list_lengths(field: str, value: tuple) -> None:
    error, _ = single_error(**{field: value})
    assert error["loc"] == (field,)
    msg = error["msg"]
    assert field in msg
    assert f"{len(value)} entries" in msg  # the value given
    assert "n_crops=[2, 6]" in msg
    assert "one value per resolution group" in msg  # the fix


def test_mismatched_lengths_with_more_groups_given_explicitly() -> None:
    with pytest.raises(ValidationError) as excinfo:
        TrainConfig(
            n_crops=(2, 2, 2),
            size_crops=(224, 96),
            min_scale_crops=(0.14, 0.05),
            max_scale_crops=(1.0, 0.14),
        )
    locs = {e["loc"] for e in excinfo.value.errors()}
    assert locs == {("size_crops",), ("min_scale_crops",), ("max_scale_crops",)}




def test_n_crops_checked_against_default_crop_lists() -> None:
    with pytest.raises(ValidationError) as excinfo:
        TrainConfig(n_crops=(2, 2, 2))
    locs = {e["loc"] for e in excinfo.value.errors()}
    assert locs == {("size_crops",), ("min_scale_crops",), ("max_scale_crops",)}


def test_min_scale_checked_against_default_max_scale() -> None:
    with pytest.raises(ValidationError) as excinfo:
        config_from(min_scale_crops=(0.5, 0.5))  # default max_scale_crops=(1.0, 0.14)
    assert excinfo.value.errors()[0]["loc"] == ("max_scale_crops",)


def test_crops_not_sorted_by_size() -> None:
    error, _ = single_error(size_crops=(96, 224))
    assert error["loc"] == ("size_crops",)
    assert "size_crops=[96, 224]" in error["msg"]
    assert "largest first" in error["msg"]
    assert "[224, 96]" in error["msg"]  # the fix, spelled out


def test_crops_equal_sizes_rejected() -> None:
    error, _ = single_error(size_crops=(96, 96))
    assert error["loc"] == ("size_crops",)
    assert "distinct" in error["msg"]


def test_crops_for_assign_out_of_range() -> None:
    error, _ = single_error(crops_for_assign=(0, 8))
    assert error["loc"] == ("crops_for_assign",)
    msg = error["msg"]
    assert "crops_for_assign=[0, 8]" in msg
    assert "[8] out of range" in msg
    assert "0..7" in msg  # the valid indices


def test_crops_for_assign_empty_and_duplicates() -> None:
    error, _ = single_error(crops_for_assign=())
    assert error["loc"] == ("crops_for_assign",)
    assert "[0, 1]" in error["msg"]
    error, _ = single_error(crops_for_assign=(1, 1))
    assert "distinct" in error["msg"]


@pytest.mark.parametrize(
    ("batch", "queue", "nearest"),
    [(256, 3000, "2816 or 3072"), (256, 100, "256"), (4096, 5000, "4096 or 8192")],
)
def test_queue_length_not_multiple_of_batch(batch: int, queue: int, nearest: str) -> None:
    error, _ = single_error(batch_size=batch, queue_length=queue)
    assert error["loc"] == ("queue_length",)
    msg = error["msg"]
    assert f"queue_length={queue}" in msg
    assert f"batch_size={batch}" in msg
    assert msg.endswith(f"use queue_length {nearest}")


def test_queue_length_valid_multiples() -> None:
    assert TrainConfig(batch_size=256, queue_length=3840).queue_length == 3840
    assert TrainConfig(batch_size=256, queue_length=0).queue_length == 0


def test_max_scale_below_min_scale() -> None:
    error, _ = single_error(min_scale_crops=(0.5, 0.05), max_scale_crops=(0.4, 0.14))
    assert error["loc"] == ("max_scale_crops",)
    assert "max_scale_crops=[0.4, 0.14]" in error["msg"]
    assert ">= its min" in error["msg"]


def test_n_crops_needs_two_crops() -> None:
    error, _ = single_error(
        n_crops=(1,),
        size_crops=(224,),
        min_scale_crops=(0.14,),
        max_scale_crops=(1.0,),
        crops_for_assign=(0,),
    )
    assert error["loc"] == ("n_crops",)
    assert "n_crops=[1]" in error["msg"]
    assert "at least 2 crops" in error["msg"]


# --------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(
    ("field", "value", "bound"),
    [
        ("sinkhorn_iterations", 0, "greater than or equal to 1"),
        ("epsilon", 0.0, "greater than 0"),
        ("epsilon", -0.05, "greater than 0"),
        ("n_prototypes", 1, "greater than or equal to 2"),
        ("temperature", 0.0, "greater than 0"),
    ],
)
def test_numeric_bounds(field: str, value: float, bound: str) -> None:
    error, text = single_error(**{field: value})
    assert error["loc"] == (field,)
    assert error["input"] == value
    assert bound in error["msg"]  # the fix
    assert f"input_value={value}" in text  # the value, in the printed error


def test_unknown_field_rejected() -> None:
    error, text = single_error(epsilonn=0.05)
    assert error["loc"] == ("epsilonn",)
    assert error["type"] == "extra_forbidden"
    assert "epsilonn" in text


def test_frozen() -> None:
    config = TrainConfig()
    with pytest.raises(ValidationError) as excinfo:
        config.epsilon = 0.1  # type: ignore[misc]
    assert excinfo.value.errors()[0]["type"] == "frozen_instance"
    assert config.epsilon == 0.05


def test_with_overrides_revalidates() -> None:
    config = TrainConfig()
    assert config.with_overrides(epsilon=0.03).epsilon == 0.03
    with pytest.raises(ValidationError):
        config.with_overrides(epsilon=0)


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", preset_names())
def test_every_preset_validates(name: str) -> None:
    config = config_from(name)
    assert isinstance(config, TrainConfig)
    assert TrainConfig.model_validate(config.model_dump()) == config


def test_small_batch_preset() -> None:
    config = config_from("small-batch")
    assert config.batch_size == 256
    assert config.queue_length == 3840
    assert config.epoch_queue_starts == 15
    assert config.queue_length % config.batch_size == 0


def test_imagenet_800ep_preset() -> None:
    config = config_from("imagenet-800ep")
    assert config.n_crops == (2, 6)
    assert config.size_crops == (224, 96)
    assert config.total_crops == 8
    assert config.batch_size == 4096
    assert config.epochs == 800


def test_unknown_preset_lists_presets() -> None:
    assert_unknown_name_lists_known(config_from, preset_names())


def test_overrides_apply_after_preset() -> None:
    config = config_from("small-batch", epochs=3)
    assert config.epochs == 3
    assert config.batch_size == 256


# --------------------------------------------------------------------------- defaults


def test_defaults_are_the_papers() -> None:
    config = TrainConfig()
    assert config.hidden_mlp == 2048
    assert config.feat_dim == 128
    assert config.n_prototypes == 3000
    assert config.temperature == 0.1
    assert config.epsilon == 0.05
    assert config.sinkhorn_iterations == 3
    assert config.n_crops == (2, 6)
    assert config.size_crops == (224, 96)
    assert config.min_scale_crops == (0.14, 0.05)
    assert config.max_scale_crops == (1.0, 0.14)
    assert config.crops_for_assign == (0, 1)
    assert config.epoch_queue_starts == 15
    assert config_from() == config


def test_preset_names_of_the_contract_are_the_presets_and_auto() -> None:
    from typing import get_args

    from swav_core.presets import PRESETS, PresetName

    assert set(get_args(PresetName)) == {"auto", *PRESETS}


def test_overrides_take_any_subset_and_check_each_field_as_train_config_does() -> None:
    from swav_core.config import TrainConfigOverrides

    given = TrainConfigOverrides.model_validate({"size_crops": [32, 24], "epochs": 3})
    assert given.model_dump(mode="json", exclude_unset=True) == {"size_crops": [32, 24],
                                                                 "epochs": 3}
    for bad in ({"epochs": 0}, {"epsilon": 0}, {"learning_rate": 0.1}):
        with pytest.raises(ValidationError) as overrides_error:
            TrainConfigOverrides.model_validate(bad)
        with pytest.raises(ValidationError) as full_error:
            TrainConfig.model_validate(bad)
        assert overrides_error.value.errors()[0]["type"] == full_error.value.errors()[0]["type"]
