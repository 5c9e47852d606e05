"""DoRA layers: invariants, merge/unmerge/unload, save/load, counts, gradients, refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from lora_lab.lora import (
    DoRAConv2d,
    DoRAEmbedding,
    DoRALinear,
    LoRAConfig,
    LoRALinear,
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
from tests.lora.testkit import make_input, make_model, nudge_adapters

CASES = [
    ("mlp", LoRAConfig(rank=3, alpha=6, use_dora=True, bias="lora_only")),
    ("conv", LoRAConfig(rank=2, alpha=4, target_modules=["conv1", "conv2", "head"], use_dora=True)),
    (
        "embed",
        LoRAConfig(
            rank=2,
            alpha=3,
            target_modules=["emb", "fc"],
            use_dora=True,
            use_rslora=True,
            modules_to_save=["head"],
        ),
    ),
]
IDS = ["mlp", "conv", "embed"]


def _dora(kind: str, config: LoRAConfig, seed: int = 0) -> nn.Module:
    model = make_model(kind)
    inject_lora(model, config)
    nudge_adapters(model, seed=seed)
    return model


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}


@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_fresh_adapter_changes_no_output(kind: str, config: LoRAConfig) -> None:
    base = make_model(kind)
    model = copy.deepcopy(base)
    inject_lora(model, config)
    x = make_input(kind)
    # m = ‖W‖ and B·A = 0, so m/‖W + 0‖ is exactly 1.
    assert torch.equal(model(x), base(x))
    model.train()
    assert torch.equal(model(x), base(x))


def test_layer_classes_and_magnitude_shapes() -> None:
    model = make_model("conv")
    inject_lora(model, CASES[1][1])
    layers = lora_layers(model)
    assert isinstance(layers["conv1"], DoRAConv2d) and isinstance(layers["head"], DoRALinear)
    assert layers["conv1"].lora_magnitude_vector.shape == (1, 5, 1, 1)  # PEFT's layout
    assert layers["head"].lora_magnitude_vector.shape == (4,)
    embed = make_model("embed")
    inject_lora(embed, CASES[2][1])
    emb = lora_layers(embed)["emb"]
    assert isinstance(emb, DoRAEmbedding) and emb.lora_magnitude_vector.shape == (8,)
    # m starts at the row norms of W (Linear: per output row).
    head = layers["head"]
    torch.testing.assert_close(
        head.lora_magnitude_vector, torch.linalg.norm(head.base_layer.weight, dim=1)
    )


def test_linear_output_is_the_decomposed_weight() -> None:
    """y = (m · (W + sBA) / ‖W + sBA‖_row) x + b, written out by hand."""
    model = _dora("mlp", CASES[0][1])
    layer = lora_layers(model)["fc2"]
    assert isinstance(layer, DoRALinear)
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    updated = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    weight = layer.lora_magnitude_vector[:, None] * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ weight.T + layer.base_layer.bias)


@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_merge_unmerge_exact_and_idempotent(kind: str, config: LoRAConfig) -> None:
    model = _dora(kind, config)
    x = make_input(kind)
    original = _weights(model)
    unmerged = model(x)
    assert not torch.allclose(unmerged, make_model(kind)(x), atol=1e-3)
    merge_lora(model)
    once = _weights(model)
    merge_lora(model)
    assert all(torch.equal(w, once[n]) for n, w in _weights(model).items())
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    unmerge_lora(model)
    assert all(torch.equal(w, original[n]) for n, w in _weights(model).items())
    assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_unload_gives_plain_layers_with_the_merged_forward(kind: str, config: LoRAConfig) -> None:
    model = _dora(kind, config)
    x = make_input(kind)
    expected = model(x)
    deltas = {n: lora_delta_weight(layer).detach() for n, layer in lora_layers(model).items()}
    pretrained = {n: w.float() for n, w in _weights(model).items()}
    unload_lora(model)
    assert not lora_layers(model)
    assert {type(m) for m in model.modules()} <= {
        type(model),
        nn.Linear,
        nn.Conv2d,
        nn.Embedding,
    }
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    for name, delta in deltas.items():  # ΔW is what DoRA adds to the pretrained W
        merged = model.get_submodule(name).weight
        torch.testing.assert_close(merged, pretrained[name] + delta, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("kind", "config"), CASES, ids=IDS)
def test_save_load_round_trip_is_exact(kind: str, config: LoRAConfig, tmp_path: Path) -> None:
    model = _dora(kind, config)
    save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] is True
    keys = load_file(tmp_path / "adapter_model.safetensors")
    for name, layer in lora_layers(model).items():
        assert torch.equal(
            keys[f"base_model.model.{name}.lora_magnitude_vector"], layer.lora_magnitude_vector
        )
    fresh = make_model(kind)
    load_adapter(fresh, tmp_path)
    x = make_input(kind)
    assert torch.equal(fresh(x), model(x))
    assert {layer.method for layer in lora_layers(fresh).values()} == {"dora"}


def test_hot_swap_between_dora_and_lora(tmp_path: Path) -> None:
    dora = _dora("mlp", CASES[0][1])
    save_adapter(dora, tmp_path / "dora")
    plain = make_model("mlp")
    inject_lora(plain, LoRAConfig(rank=3, alpha=6, bias="lora_only"))
    nudge_adapters(plain, seed=5)
    save_adapter(plain, tmp_path / "lora")
    x = make_input("mlp")
    model = make_model("mlp")
    load_adapter(model, tmp_path / "lora")
    load_adapter(model, tmp_path / "dora")
    assert all(isinstance(layer, DoRALinear) for layer in lora_layers(model).values())
    assert torch.equal(model(x), dora(x))
    load_adapter(model, tmp_path / "lora")
    assert all(type(layer) is LoRALinear for layer in lora_layers(model).values())
    assert torch.equal(model(x), plain(x))


def test_parameter_counts_add_one_magnitude_per_output() -> None:
    model = make_model("mlp")
    frozen = count_parameters(model)["total"]
    inject_lora(model, LoRAConfig(rank=2, alpha=2, use_dora=True))
    dims = [(6, 12), (12, 12), (12, 4)]
    expected = sum(2 * (i + o) + o for i, o in dims)
    assert count_parameters(model) == {
        "trainable": expected,
        "frozen": frozen,
        "total": expected + frozen,
    }
    assert sum(p.numel() for p in lora_parameters(model)) == expected
    conv = make_model("conv")
    inject_lora(conv, LoRAConfig(rank=2, alpha=2, target_modules=["conv2"], use_dora=True))
    assert count_parameters(conv)["trainable"] == 2 * 5 * 9 + 6 * 2 + 6


def test_gradients_reach_factors_and_magnitude_only() -> None:
    model = _dora("mlp", CASES[0][1])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(lora_parameters(model), lr=0.1)
    model(make_input("mlp")).square().sum().backward()
    for layer in lora_layers(model).values():
        assert layer.lora_magnitude_vector.grad is not None
        assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    optimizer.step()
    trainable = {id(p) for p in lora_parameters(model)}
    for name, param in model.named_parameters():
        changed = not torch.equal(param, before[name])
        assert changed == (id(param) in trainable), name


def test_the_norm_passes_no_gradient() -> None:
    """With the norm detached, ∂y/∂m is the normalised direction times the input (PEFT, §4.3)."""
    layer = DoRALinear(nn.Linear(4, 3), rank=2, alpha=2)
    nudge_adapters(nn.Sequential(layer))
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    layer(x).sum().backward()
    weight = layer.base_layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    direction = (weight / weight.norm(dim=1, keepdim=True)).detach()
    torch.testing.assert_close(layer.lora_magnitude_vector.grad, (x @ direction.T).sum(0))


def test_dora_on_an_unsupported_layer_names_it() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"module '1' is a LayerNorm; DoRA supports only"):
        inject_lora(model, LoRAConfig(rank=2, alpha=2, target_modules=["0", "1"], use_dora=True))
    assert not lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
