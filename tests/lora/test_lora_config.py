"""LoRAConfig validation and its mapping to PEFT's adapter_config.json."""

from __future__ import annotations

import math

import pytest

from lora_lab.lora import LoRAConfig


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rank": 0}, r"rank must be an int >= 1, got 0"),
        ({"rank": -3}, r"rank must be an int >= 1, got -3"),
        ({"rank": 2.0}, r"rank must be an int >= 1, got 2\.0 \(float\)"),
        ({"rank": True}, r"rank must be an int >= 1, got True \(bool\)"),
        ({"rank": "abc"}, r"rank must be an int >= 1, got 'abc' \(str\)"),
        ({"rank": "8"}, r"rank must be an int >= 1, got '8' \(str\)"),
        ({"alpha": 0}, r"alpha must be a finite number > 0, got 0"),
        ({"alpha": -1.5}, r"alpha must be a finite number > 0, got -1\.5"),
        ({"alpha": "16"}, r"alpha must be a finite number > 0, got '16'"),
        ({"alpha": float("nan")}, r"alpha must be a finite number > 0, got nan"),
        ({"alpha": False}, r"alpha must be a finite number > 0, got False"),
        ({"dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1\.0"),
        ({"dropout": -0.1}, r"dropout must be a number in \[0, 1\), got -0\.1"),
        ({"dropout": "0.1"}, r"dropout must be a number in \[0, 1\), got '0\.1'"),
        (
            {"init": "xavier"},
            r"init must be one of \('kaiming', 'gaussian', 'pissa'\), got 'xavier'",
        ),
        ({"use_dora": 1}, r"use_dora must be True or False, got 1"),
        (
            {"use_dora": True, "init": "pissa"},
            r"use_dora=True cannot be combined with init='pissa'",
        ),
        ({"bias": "some"}, r"bias must be one of \('none', 'all', 'lora_only'\), got 'some'"),
        ({"target_modules": 3}, r"target_modules must be a string or a list/tuple"),
        ({"target_modules": {"fc1": 1}}, r"target_modules must be a string or a list/tuple"),
        ({"target_modules": []}, r"target_modules must be a non-empty list"),
        ({"target_modules": ["fc1", 2]}, r"target_modules must be a non-empty list"),
        ({"target_modules": "("}, r"target_modules '\(' is neither 'all-linear' nor a valid"),
        ({"target_modules": ""}, r"target_modules must not be an empty string"),
        ({"modules_to_save": "head"}, r"modules_to_save must be a string or a list/tuple"),
        ({"use_rslora": 1}, r"use_rslora must be True or False, got 1"),
    ],
)
def test_bad_values_raise_one_line_value_error(kwargs: dict, message: str) -> None:
    arguments = {"rank": 4, "alpha": 8.0} | kwargs
    with pytest.raises(ValueError, match=message) as info:
        LoRAConfig(**arguments)
    assert "\n" not in str(info.value)


def test_defaults_and_normalisation() -> None:
    config = LoRAConfig(rank=4, alpha=8)
    assert config.target_modules == "all-linear"
    assert config.dropout == 0.0 and config.init == "kaiming" and config.bias == "none"
    assert config.modules_to_save is None
    listed = LoRAConfig(rank=4, alpha=8, target_modules=["fc1"], modules_to_save=["head"])
    assert listed.target_modules == ("fc1",) and listed.modules_to_save == ("head",)


def test_scaling_plain_and_rslora() -> None:
    assert LoRAConfig(rank=4, alpha=8).scaling == 2.0
    assert math.isclose(LoRAConfig(rank=4, alpha=8, use_rslora=True).scaling, 4.0)


def test_peft_dict_round_trip() -> None:
    config = LoRAConfig(
        rank=3,
        alpha=6,
        dropout=0.1,
        target_modules=["a", "b"],
        use_rslora=True,
        init="gaussian",
        bias="lora_only",
        modules_to_save=["head"],
    )
    peft = config.to_peft_dict(["a", "b"], ["head"])
    assert peft["peft_type"] == "LORA" and peft["r"] == 3 and peft["lora_alpha"] == 6
    assert peft["init_lora_weights"] == "gaussian" and peft["task_type"] is None
    assert LoRAConfig.from_peft_dict(peft) == config
    assert LoRAConfig(rank=3, alpha=6).to_peft_dict("x", None)["init_lora_weights"] is True


@pytest.mark.parametrize(
    ("kwargs", "method", "peft_keys"),
    [
        ({"use_dora": True}, "dora", {"use_dora": True, "init_lora_weights": True}),
        ({"init": "pissa"}, "pissa", {"use_dora": False, "init_lora_weights": "pissa"}),
        ({}, "lora", {"use_dora": False, "init_lora_weights": True}),
    ],
)
def test_methods_map_to_peft_keys_and_back(kwargs: dict, method: str, peft_keys: dict) -> None:
    config = LoRAConfig(rank=2, alpha=4, target_modules=["fc1"], **kwargs)
    assert config.method == method
    peft = config.to_peft_dict(["fc1"], None)
    assert {k: peft[k] for k in peft_keys} == peft_keys
    assert LoRAConfig.from_peft_dict(peft) == config


@pytest.mark.parametrize(
    ("update", "message"),
    [
        ({"peft_type": "IA3"}, "peft_type must be 'LORA'"),
        ({"use_dora": "yes"}, "use_dora must be True or False"),
        ({"use_dora": True, "init_lora_weights": "pissa"}, "cannot be combined"),
        ({"rank_pattern": {"fc1": 2}}, "rank_pattern=.* is not supported"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out=True is not supported"),
        ({"init_lora_weights": "pissa_niter_4"}, "init_lora_weights='pissa_niter_4' is not"),
        ({"r": 0}, "rank must be an int >= 1"),
    ],
)
def test_unsupported_peft_configs_are_refused(update: dict, message: str) -> None:
    peft = LoRAConfig(rank=2, alpha=4).to_peft_dict(["fc1"], None) | update
    with pytest.raises(ValueError, match=message):
        LoRAConfig.from_peft_dict(peft)
