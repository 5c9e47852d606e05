"""PiSSA layers: SVD init, residual base, rank-2r conversion on save, refusals, merge/unload."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_lab.lora import (
    LoRAConfig,
    LoRALinear,
    PiSSALinear,
    count_parameters,
    inject_lora,
    load_adapter,
    lora_delta_weight,
    lora_layers,
    lora_parameters,
    merge_lora,
    save_adapter,
    unload_lora,
    unmerge_lora,
)
from tests.lora.testkit import (
    assert_same_snapshot,
    make_input,
    make_model,
    nudge_adapters,
    snapshot,
)

CONFIG = LoRAConfig(
    rank=3, alpha=6, target_modules=["fc1", "fc2"], init="pissa", modules_to_save=["head"]
)


def _trained(config: LoRAConfig = CONFIG, seed: int = 0) -> nn.Module:
    """A PiSSA model whose factors and saved head moved away from their init."""
    model = make_model("mlp")
    inject_lora(model, config)
    nudge_adapters(model, seed=seed, scale=0.2)
    with torch.no_grad():
        model.head.weight.add_(0.1)
    return model


def test_output_at_init_equals_the_base() -> None:
    base = make_model("mlp")
    model = copy.deepcopy(base)
    inject_lora(model, CONFIG)
    x = make_input("mlp")
    torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-5)
    for name, layer in lora_layers(model).items():
        assert isinstance(layer, PiSSALinear)
        pretrained = base.get_submodule(name).weight
        assert torch.equal(layer.pretrained_weight, pretrained)
        rebuilt = (
            layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
        )
        torch.testing.assert_close(rebuilt, pretrained, rtol=0, atol=1e-6)
        assert torch.allclose(lora_delta_weight(layer), torch.zeros_like(pretrained))


def test_factors_are_the_scaled_principal_components() -> None:
    layer = PiSSALinear(nn.Linear(7, 5), rank=2, alpha=3, use_rslora=True)
    u, s, vh = torch.linalg.svd(layer.pretrained_weight, full_matrices=False)
    scale = torch.sqrt(s[:2] / layer.scaling)
    torch.testing.assert_close(layer.lora_A.weight, scale[:, None] * vh[:2])
    torch.testing.assert_close(layer.lora_B.weight, u[:, :2] * scale[None, :])
    assert torch.equal(layer.pissa_initial_A, layer.lora_A.weight)
    assert torch.equal(layer.pissa_initial_B, layer.lora_B.weight)
    # The buffers stay out of the state dict: PEFT's layout, and the same parameter count.
    assert set(layer.state_dict()) == {
        "base_layer.weight",
        "base_layer.bias",
        "lora_A.weight",
        "lora_B.weight",
    }
    assert count_parameters(layer)["trainable"] == 2 * (7 + 5)


def test_only_the_factors_train() -> None:
    model = _trained(dataclasses.replace(CONFIG, modules_to_save=None))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.1)
    model(make_input("mlp")).square().sum().backward()
    optimizer.step()
    trainable = {id(p) for p in lora_parameters(model)}
    for name, param in model.named_parameters():
        assert (not torch.equal(param, before[name])) == (id(param) in trainable), name


@pytest.mark.parametrize("use_rslora", [False, True])
def test_saved_adapter_is_a_rank_2r_lora_on_the_pretrained_network(
    use_rslora: bool, tmp_path: Path
) -> None:
    config = dataclasses.replace(CONFIG, use_rslora=use_rslora)
    model = _trained(config)
    x = make_input("mlp")
    expected = model(x)
    assert not torch.allclose(expected, make_model("mlp")(x), atol=1e-3)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["r"] == 6 and saved["init_lora_weights"] is True
    assert saved["lora_alpha"] == pytest.approx(6 * (math.sqrt(2) if use_rslora else 2))
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    layer = lora_layers(model)["fc1"]
    assert isinstance(layer, PiSSALinear)
    a, b = (
        tensors["base_model.model.fc1.lora_A.weight"],
        tensors["base_model.model.fc1.lora_B.weight"],
    )
    assert a.shape == (6, 6) and b.shape == (12, 6)
    assert torch.equal(a[3:], layer.pissa_initial_A) and torch.equal(
        b[:, 3:], -layer.pissa_initial_B
    )
    assert "base_model.model.head.weight" in tensors  # modules_to_save kept

    fresh = make_model("mlp")  # unmodified pretrained weights, nothing injected
    load_adapter(fresh, tmp_path)
    assert all(type(layer) is LoRALinear for layer in lora_layers(fresh).values())
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=1e-5)
    # The model that saved is untouched by saving.
    assert torch.equal(model(x), expected)


def test_merge_unmerge_and_unload_use_the_residual() -> None:
    model = _trained()
    x = make_input("mlp")
    expected = model(x)
    residual = {
        n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()
    }
    merge_lora(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    unmerge_lora(model)
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, residual[name])
    layers = {n: layer for n, layer in lora_layers(model).items()}
    pretrained = {n: layer.pretrained_weight.clone() for n, layer in layers.items()}
    deltas = {n: lora_delta_weight(layer).detach() for n, layer in layers.items()}
    unload_lora(model)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    for name, layer in layers.items():
        weight = model.get_submodule(name).weight
        # W_res + s·B·A = W + s·(B·A − B₀·A₀)
        torch.testing.assert_close(weight, pretrained[name] + deltas[name], rtol=0, atol=1e-6)
        ab = layer.lora_B.weight @ layer.lora_A.weight
        torch.testing.assert_close(weight, residual[name] + layer.scaling * ab, rtol=0, atol=1e-6)


def test_loading_another_adapter_restores_the_pretrained_weights(tmp_path: Path) -> None:
    plain = make_model("mlp")
    inject_lora(plain, LoRAConfig(rank=3, alpha=6, target_modules=["fc1", "fc2"]))
    nudge_adapters(plain, seed=3)
    save_adapter(plain, tmp_path / "plain")
    model = make_model("mlp")
    inject_lora(model, dataclasses.replace(CONFIG, modules_to_save=None))
    load_adapter(model, tmp_path / "plain")  # same rank and targets: still rebuilt
    x = make_input("mlp")
    assert torch.equal(model(x), plain(x))
    pristine = make_model("mlp")
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, pristine.get_submodule(name).weight)


@pytest.mark.parametrize("rank", [7, 13])
def test_rank_above_the_layer_limit_is_refused_before_any_change(rank: int) -> None:
    # fc1 is [12, 6] (limit 6), fc2 [12, 12] (limit 12): at rank 7 fc2 alone would be fine,
    # and fc2 must stay untouched all the same.
    model = make_model("mlp")
    before = snapshot(model)
    config = LoRAConfig(rank=rank, alpha=2, target_modules=["fc2", "fc1"], init="pissa")
    with pytest.raises(ValueError, match=r"module 'fc1'.*rank <= min\(in, out\) = 6 .*rank="):
        inject_lora(model, config)
    assert_same_snapshot(before, snapshot(model))


def test_rank_above_the_limit_is_refused_by_load_adapter(tmp_path: Path) -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=7, alpha=2, target_modules=["fc2"]))
    save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    config["init_lora_weights"] = "pissa"
    config["target_modules"] = ["fc1", "fc2"]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"module 'fc1'.*= 6"):
        load_adapter(model, tmp_path)
    assert_same_snapshot(before, snapshot(model))


@pytest.mark.parametrize(
    ("kind", "targets", "layer"), [("conv", ["conv1"], "Conv2d"), ("embed", ["emb"], "Embedding")]
)
def test_non_linear_targets_are_refused(kind: str, targets: list[str], layer: str) -> None:
    model = make_model(kind)
    before = snapshot(model)
    config = LoRAConfig(rank=1, alpha=1, target_modules=targets, init="pissa")
    with pytest.raises(
        ValueError, match=rf"'{targets[0]}' is a {layer}; init='pissa' supports nn.Linear"
    ):
        inject_lora(model, config)
    assert_same_snapshot(before, snapshot(model))


def test_a_network_sharing_the_pretrained_weights_keeps_them() -> None:
    model = make_model("mlp")
    other = make_model("mlp")
    other.fc1.weight = model.fc1.weight  # e.g. frozen weights shared between runs
    inject_lora(model, CONFIG)
    assert torch.equal(other.fc1.weight, make_model("mlp").fc1.weight)
    assert model.fc1.base_layer.weight is not other.fc1.weight
