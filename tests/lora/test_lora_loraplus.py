"""lora_parameter_groups: one group without LoRA+, PEFT's LoRA+ grouping with it, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lora_lab.lora import LoRAConfig, inject_lora, lora_parameter_groups, lora_parameters
from tests.lora.testkit import make_model


def _names(model: nn.Module, group: dict) -> set[str]:
    lookup = {id(p): n for n, p in model.named_parameters()}
    return {lookup[id(p)] for p in group["params"]}


def _by_lr(model: nn.Module, groups: list[dict]) -> dict[float, set[str]]:
    return {group["lr"]: _names(model, group) for group in groups}


def test_without_a_ratio_one_group_holds_every_trainable_parameter() -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, modules_to_save=["head"], bias="lora_only"))
    (group,) = lora_parameter_groups(model, lr=1e-3)
    assert group["lr"] == 1e-3
    assert [id(p) for p in group["params"]] == [id(p) for p in lora_parameters(model)]


def test_a_model_without_adapter_groups_its_trainable_parameters() -> None:
    model = make_model("mlp")
    model.fc1.requires_grad_(False)
    (group,) = lora_parameter_groups(model, lr=0.1)
    assert _names(model, group) == {n for n, p in model.named_parameters() if p.requires_grad}


def test_loraplus_puts_b_and_1d_tensors_at_lr_times_ratio() -> None:
    model = make_model("mlp")
    config = LoRAConfig(
        rank=2, alpha=2, target_modules=["fc1", "fc2"], modules_to_save=["head"], bias="lora_only"
    )
    inject_lora(model, config)
    groups = lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=16)
    assert [g["name"] for g in groups] == ["lora_A", "lora_B"]
    assert _by_lr(model, groups) == {
        1e-3: {"fc1.lora_A.weight", "fc2.lora_A.weight", "head.weight"},
        # PEFT sends every 1-D trainable tensor (biases too) to its B groups.
        1e-3 * 16: {
            "fc1.lora_B.weight",
            "fc2.lora_B.weight",
            "fc1.base_layer.bias",
            "fc2.base_layer.bias",
            "head.bias",
        },
    }


def test_dora_magnitudes_follow_peft_linear_with_b_conv_with_a() -> None:
    model = make_model("conv")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["conv1", "head"], use_dora=True))
    by_lr = _by_lr(model, lora_parameter_groups(model, lr=0.01, loraplus_lr_ratio=4))
    assert by_lr == {
        # The Conv2d magnitude is [1, out, 1, 1] in PEFT: not 1-D, so it stays at lr.
        0.01: {"conv1.lora_A.weight", "head.lora_A.weight", "conv1.lora_magnitude_vector"},
        0.04: {"conv1.lora_B.weight", "head.lora_B.weight", "head.lora_magnitude_vector"},
    }


def test_embedding_adapters_get_their_own_rate() -> None:
    model = make_model("embed")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["emb", "fc"], use_dora=True))
    groups = lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=2)
    by_lr = _by_lr(model, groups)
    assert by_lr[1e-6] == {"emb.lora_embedding_A", "emb.lora_embedding_B"}  # PEFT's default
    assert "emb.lora_magnitude_vector" in by_lr[2e-3]
    custom = lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=2, loraplus_lr_embedding=5e-4)
    assert _by_lr(model, custom)[5e-4] == by_lr[1e-6]


def test_groups_build_an_optimizer_that_steps() -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2))
    optimizer = torch.optim.AdamW(lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=8))
    model(torch.randn(3, 6)).sum().backward()
    optimizer.step()
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 8e-3]


@pytest.mark.parametrize("ratio", [0, -1.0, math.nan, math.inf, True, "16"])
def test_bad_ratio_is_refused(ratio: object) -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2))
    with pytest.raises(ValueError, match=r"^loraplus_lr_ratio must be a finite number > 0, got"):
        lora_parameter_groups(model, lr=1e-3, loraplus_lr_ratio=ratio)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"loraplus_lr_embedding": 0}, "loraplus_lr_embedding"),
    ],
)
def test_bad_rates_name_the_argument(kwargs: dict, name: str) -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2))
    arguments = {"lr": 1e-3, "loraplus_lr_ratio": 2.0} | kwargs
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number > 0"):
        lora_parameter_groups(model, **arguments)


def test_a_frozen_model_is_refused() -> None:
    model = make_model("mlp").requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lora_parameter_groups(model, lr=1e-3)
