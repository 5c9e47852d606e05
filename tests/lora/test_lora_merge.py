"""merge_lora / unmerge_lora / unload_lora: equivalence, idempotence, exact restore."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_lab.lora import (
    LoRAConfig,
    inject_lora,
    is_merged,
    lora_layers,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from tests.lora.testkit import make_input, make_model, perturb_adapters

CASES = [
    ("mlp", LoRAConfig(rank=3, alpha=6)),
    ("conv", LoRAConfig(rank=2, alpha=4, target_modules=["conv1", "conv2", "head"])),
    ("embed", LoRAConfig(rank=2, alpha=4, target_modules=["emb", "fc"], use_rslora=True)),
]


def _adapted(kind: str, config: LoRAConfig) -> nn.Module:
    model = make_model(kind)
    inject_lora(model, config)
    perturb_adapters(model)
    return model


def _base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: layer.base_layer.weight.detach().clone() for n, layer in lora_layers(model).items()}


@pytest.mark.parametrize(("kind", "config"), CASES)
def test_merged_matches_unmerged_and_unmerge_is_exact(kind: str, config: LoRAConfig) -> None:
    model = _adapted(kind, config)
    x = make_input(kind)
    original = _base_weights(model)
    unmerged = model(x)
    assert not torch.equal(unmerged, make_model(kind)(x))  # the adapter does something
    merge_lora(model)
    assert is_merged(model)
    torch.testing.assert_close(model(x), unmerged, rtol=0, atol=1e-5)
    unmerge_lora(model)
    assert not is_merged(model)
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, original[name]), name
    assert torch.equal(model(x), unmerged)


@pytest.mark.parametrize(("kind", "config"), CASES)
def test_merge_and_unmerge_are_idempotent(kind: str, config: LoRAConfig) -> None:
    model = _adapted(kind, config)
    original = _base_weights(model)
    merge_lora(model)
    once = _base_weights(model)
    merge_lora(model)
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, once[name]), name
    unmerge_lora(model)
    unmerge_lora(model)
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, original[name]), name


def test_train_and_eval_never_change_merge_state() -> None:
    model = _adapted("mlp", LoRAConfig(rank=2, alpha=2))
    model.eval()
    assert not is_merged(model)
    merge_lora(model)
    merged_weights = _base_weights(model)
    model.train()
    model.eval()
    assert is_merged(model)
    for name, weight in _base_weights(model).items():
        assert torch.equal(weight, merged_weights[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_merge_casts_back_and_unmerges_exactly(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16)).to(dtype)
    inject_lora(model, LoRAConfig(rank=4, alpha=4))
    perturb_adapters(model)
    weight = model[0].base_layer.weight
    original = weight.detach().clone()
    expected = (original.float() + model[0].delta_weight()).to(dtype)
    merge_lora(model)
    assert weight.dtype == dtype
    assert torch.equal(weight, expected)  # delta computed in fp32, one rounding at the end
    unmerge_lora(model)
    assert torch.equal(weight, original)


def test_merge_keeps_the_parameter_objects() -> None:
    model = _adapted("mlp", LoRAConfig(rank=2, alpha=2))
    params = [id(p) for p in model.parameters()]
    merge_lora(model)
    unmerge_lora(model)
    assert [id(p) for p in model.parameters()] == params


@pytest.mark.parametrize(("kind", "config"), CASES)
def test_unload_gives_plain_layers_with_merged_weights(kind: str, config: LoRAConfig) -> None:
    model = _adapted(kind, config)
    x = make_input(kind)
    expected = model(x)
    returned = unload_lora(model)
    assert returned is model
    assert not lora_layers(model)
    assert all(type(m) in (nn.Linear, nn.Conv2d, nn.Embedding) for m in model.children())
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    assert set(model.state_dict()) == set(make_model(kind).state_dict())
    assert not any(b is not None for _, b in model.named_buffers())


def test_unload_of_a_merged_model_drops_the_saved_copy() -> None:
    model = _adapted("mlp", LoRAConfig(rank=2, alpha=2))
    x = make_input("mlp")
    merge_lora(model)
    expected = model(x)
    unload_lora(model)
    assert torch.equal(model(x), expected)


def test_without_lora_layers_merge_functions_refuse() -> None:
    model = make_model("mlp")
    for function in (merge_lora, unmerge_lora, unload_lora):
        with pytest.raises(ValueError, match="the model has no LoRA layers"):
            function(model)
    assert not is_merged(model)


def test_tied_weights_are_not_merged_twice() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    model[1].weight = model[0].weight
    inject_lora(model, LoRAConfig(rank=1, alpha=1))
    with pytest.raises(ValueError, match="share one weight"):
        merge_lora(model)
    assert not is_merged(model)
