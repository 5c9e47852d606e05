"""inject_lora: target matching, freezing, trainable sets, errors and warnings."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lora_lab.lora import (
    LoRAConfig,
    LoRAConv2d,
    LoRAEmbedding,
    LoRALinear,
    count_parameters,
    inject_lora,
    lora_config,
    lora_layers,
    lora_parameters,
)
from tests.lora.testkit import make_input, make_model, perturb_adapters


@pytest.mark.parametrize(
    ("kind", "targets"),
    [("mlp", "all-linear"), ("conv", ["conv1", "conv2", "head"]), ("embed", ["emb", "fc"])],
)
def test_fresh_adapter_leaves_the_model_output_unchanged(kind: str, targets: object) -> None:
    model = make_model(kind)
    x = make_input(kind)
    before = model(x)
    inject_lora(model, LoRAConfig(rank=3, alpha=6, target_modules=targets))
    assert torch.equal(model(x), before)


def test_all_linear_wraps_every_linear_including_the_head() -> None:
    model = make_model("mlp")
    names = inject_lora(model, LoRAConfig(rank=2, alpha=2))
    assert names == ["fc1", "fc2", "head"]
    assert all(isinstance(layer, LoRALinear) for layer in lora_layers(model).values())


def test_modules_to_save_are_not_wrapped_and_train_in_full() -> None:
    model = make_model("mlp")
    head = model.head
    names = inject_lora(model, LoRAConfig(rank=2, alpha=2, modules_to_save=["head"]))
    assert names == ["fc1", "fc2"]
    assert model.head is head  # kept in place, not copied
    assert all(p.requires_grad for p in head.parameters())
    trainable = {id(p) for p in lora_parameters(model)}
    assert {id(p) for p in head.parameters()} <= trainable


def test_target_list_matches_exact_names_and_dot_suffixes() -> None:
    model = nn.Sequential(make_model("mlp"), make_model("mlp"))
    names = inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["fc1", "1.head"]))
    assert names == ["0.fc1", "1.fc1", "1.head"]


def test_suffix_match_needs_a_dot_boundary() -> None:
    model = nn.Module()
    model.fc1 = nn.Linear(2, 2)
    model.xfc1 = nn.Linear(2, 2)
    assert inject_lora(model, LoRAConfig(rank=1, alpha=1, target_modules=["fc1"])) == ["fc1"]


def test_regex_target_is_a_full_match() -> None:
    model = make_model("conv")
    names = inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=r"conv\d"))
    assert names == ["conv1", "conv2"]
    assert all(isinstance(m, LoRAConv2d) for m in lora_layers(model).values())
    model = make_model("conv")
    with pytest.raises(ValueError, match="matched no module"):
        inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules="conv"))


def test_embedding_targets_become_lora_embedding() -> None:
    model = make_model("embed")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["emb"]))
    assert isinstance(model.emb, LoRAEmbedding)


def test_nothing_matched_lists_the_candidate_layers() -> None:
    model = make_model("conv")
    with pytest.raises(
        ValueError, match=r"matched no module; candidate layers .*conv1, conv2, head"
    ):
        inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["attention"]))


def test_unsupported_matched_type_is_named() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    with pytest.raises(
        ValueError, match=r"module '1' is a LayerNorm; LoRA supports only nn.Linear"
    ):
        inject_lora(model, LoRAConfig(rank=1, alpha=1, target_modules=["0", "1"]))


def test_grouped_conv_target_is_refused_with_its_name() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match=r"module '0': grouped Conv2d"):
        inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["0"]))


def test_target_inside_modules_to_save_is_a_conflict() -> None:
    model = make_model("mlp")
    with pytest.raises(ValueError, match="adapted or saved in full, not both"):
        inject_lora(
            model, LoRAConfig(rank=1, alpha=1, target_modules=["head"], modules_to_save=["head"])
        )


def test_unknown_modules_to_save_is_refused() -> None:
    with pytest.raises(ValueError, match=r"modules_to_save entries \['classifier'\] match no"):
        inject_lora(make_model("mlp"), LoRAConfig(rank=1, alpha=1, modules_to_save=["classifier"]))


def test_injecting_twice_is_refused() -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2))
    with pytest.raises(ValueError, match="model already has LoRA layers"):
        inject_lora(model, LoRAConfig(rank=2, alpha=2))


def test_shared_module_is_refused() -> None:
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    with pytest.raises(ValueError, match="shared under several names"):
        inject_lora(model, LoRAConfig(rank=1, alpha=1))


def test_config_is_stored_on_the_model() -> None:
    model = make_model("mlp")
    config = LoRAConfig(rank=2, alpha=2)
    inject_lora(model, config)
    assert lora_config(model) == config


@pytest.mark.parametrize(
    ("bias", "expected_biases"),
    [("none", set()), ("lora_only", {"fc1", "fc2"}), ("all", {"fc1", "fc2", "head"})],
)
def test_bias_modes_choose_trainable_biases(bias: str, expected_biases: set[str]) -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["fc1", "fc2"], bias=bias))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapters = {f"{m}.lora_{f}.weight" for m in ("fc1", "fc2") for f in "AB"}
    biases = {f"{m}.base_layer.bias" if m != "head" else "head.bias" for m in expected_biases}
    assert trainable == adapters | biases
    assert {id(p) for p in lora_parameters(model)} == {
        id(p) for p in model.parameters() if p.requires_grad
    }


def test_trainable_set_is_not_chosen_by_name() -> None:
    # A base module whose name contains "lora_" must stay frozen.
    model = make_model("mlp")
    model.lora_gate = nn.Linear(4, 4)
    inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["fc1"]))
    assert not any(p.requires_grad for p in model.lora_gate.parameters())


def test_parameter_count_matches_the_formula() -> None:
    model = make_model("conv")
    rank = 3
    inject_lora(model, LoRAConfig(rank=rank, alpha=3, target_modules=["conv1", "conv2", "head"]))
    conv1 = rank * (3 * 3 * 3) + 5 * rank
    conv2 = rank * (5 * 3 * 3) + 6 * rank
    head = rank * (6 + 4)
    counts = count_parameters(model)
    assert counts["trainable"] == conv1 + conv2 + head
    assert counts["total"] == counts["trainable"] + counts["frozen"]
    assert counts["frozen"] == sum(p.numel() for p in make_model("conv").parameters())


@pytest.mark.parametrize(
    ("kind", "config"),
    [
        ("mlp", LoRAConfig(rank=2, alpha=4, bias="lora_only", modules_to_save=["head"])),
        ("conv", LoRAConfig(rank=2, alpha=4, target_modules=["conv1", "conv2"], bias="all")),
        ("embed", LoRAConfig(rank=2, alpha=4, target_modules=["emb", "fc"])),
    ],
)
def test_training_changes_only_the_trainable_set(kind: str, config: LoRAConfig) -> None:
    model = make_model(kind)
    inject_lora(model, config)
    perturb_adapters(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {id(p) for p in lora_parameters(model)}
    optimizer = torch.optim.Adam(lora_parameters(model), lr=0.05)
    for step in range(3):
        optimizer.zero_grad()
        model(make_input(kind, seed=step)).square().mean().backward()
        optimizer.step()
    for name, param in model.named_parameters():
        if id(param) in trainable:
            assert not torch.equal(param, before[name]), f"{name} did not train"
        else:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
            assert param.grad is None


def test_oversized_adapter_logs_a_warning_once(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lora_lab.lora import inject

    monkeypatch.setattr(inject, "_WARNED", set())
    with caplog.at_level(logging.WARNING, logger="lora_lab.lora"):
        for _ in range(3):  # a sweep builds the same adapter for every seed and method
            model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 10))
            inject_lora(model, LoRAConfig(rank=16, alpha=16))
    messages = [r.getMessage() for r in caplog.records if r.name == "lora_lab.lora"]
    assert len(messages) == 1 and "LoRA adapter on 1 has 1184 parameters" in messages[0]


def test_small_adapter_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lora_lab.lora"):
        inject_lora(make_model("mlp"), LoRAConfig(rank=1, alpha=1))
    assert not caplog.records


def test_multihead_attention_out_proj_is_skipped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model = nn.Module()
    model.attn = nn.MultiheadAttention(8, 2)
    model.proj = nn.Linear(8, 8)
    with caplog.at_level(logging.WARNING, logger="lora_lab.lora"):
        assert inject_lora(model, LoRAConfig(rank=1, alpha=1)) == ["proj"]
    assert "attn.out_proj" in caplog.text


def test_target_entries_that_match_nothing_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lora_lab.lora"):
        names = inject_lora(
            make_model("mlp"), LoRAConfig(rank=1, alpha=1, target_modules=["fc1", "fc7"])
        )
    assert names == ["fc1"]
    assert "['fc7'] match no module" in caplog.text
