"""Grouped (fused) maths: a grouped network gives every member the output and the gradients its
own network gives, for every method (LoRA, rsLoRA, DoRA, PiSSA) mixed in one group, and every
layer type (Linear, Conv2d, Embedding), with trained biases and `modules_to_save` copies."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from torch import nn

from lora_lab.lora import LoRAConfig, inject_lora, lora_layers
from lora_lab.lora.grouped import (
    GroupedLoRAConv2d,
    GroupedLoRALinear,
    GroupingError,
    PerMember,
    check_groupable,
    check_grouped,
    group_networks,
    share_frozen,
)
from lora_lab.models import MLP, ConvNet

METHODS = {
    "default": {},
    "rslora": {"use_rslora": True},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
}


class Tokens(nn.Module):
    """An embedding bag classifier: token ids [B, T] → logits [B, C]."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x)).mean(dim=1))


def members(
    make: Callable[[], nn.Module], configs: list[LoRAConfig], nudge: bool = True
) -> list[nn.Module]:
    torch.manual_seed(0)
    base = make()
    networks = []
    for k, config in enumerate(configs):
        network = copy.deepcopy(base)
        torch.manual_seed(k + 1)
        inject_lora(network, config)
        if nudge:  # trained-looking adapters, biases and heads, so that every term counts
            with torch.no_grad():
                for param in network.parameters():
                    if param.requires_grad:
                        param.add_(torch.randn(param.shape) * 0.1)
        networks.append(network)
    return networks


def assert_members_equal_alone(
    networks: list[nn.Module], inputs: torch.Tensor, target: torch.Tensor, train: bool = True
) -> None:
    grouped = group_networks(networks)
    grouped.train(train)
    outputs = grouped(inputs)
    assert outputs.shape[:2] == (len(networks), inputs.shape[0])
    sum(nn.functional.cross_entropy(out, target) for out in outputs).backward()
    together = [
        {n: p.grad.clone() for n, p in net.named_parameters() if p.requires_grad}
        for net in networks
    ]
    for network, out, grads in zip(networks, outputs, together, strict=True):
        network.zero_grad()
        network.train(train)
        alone = network(inputs)
        torch.testing.assert_close(out, alone, atol=2e-6, rtol=1e-5)
        nn.functional.cross_entropy(alone, target).backward()
        for name, param in network.named_parameters():
            if param.requires_grad:
                assert grads[name].abs().max() > 0, name  # the gradient reached it
                torch.testing.assert_close(grads[name], param.grad, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_every_method_in_one_group_of_linear_layers(bias: str):
    configs = [
        LoRAConfig(rank=rank, alpha=8, bias=bias, modules_to_save=["head"], **METHODS[method])
        for rank in (1, 3)
        for method in METHODS
    ]
    configs = [
        LoRAConfig(**{**c.__dict__, "target_modules": ["hidden.0", "hidden.1"]}) for c in configs
    ]
    networks = members(lambda: MLP(input_shape=(9,), num_classes=4, hidden_sizes=(8, 7)), configs)
    grouped = group_networks(networks)
    assert isinstance(grouped.hidden[0], GroupedLoRALinear)  # shared input
    assert isinstance(grouped.hidden[1], GroupedLoRALinear)  # folded input
    assert isinstance(grouped.head, PerMember)
    inputs, target = torch.randn(16, 9), torch.randint(0, 4, (16,))
    assert_members_equal_alone(networks, inputs, target)


@pytest.mark.parametrize("method", ["default", "rslora", "dora"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_convnet_adapters_group_on_conv_and_linear_layers(method: str, bias: str):
    targets = ["conv1", "conv2", "fc1", "head"] if bias == "none" else ["conv2", "fc1", "head"]
    configs = [
        LoRAConfig(rank=rank, alpha=4, target_modules=targets, bias=bias, **METHODS[method])
        for rank in (1, 2, 4)
    ]
    networks = members(lambda: ConvNet(input_shape=(1, 16, 16), num_classes=3), configs)
    grouped = group_networks(networks)
    expected = PerMember if method == "dora" else GroupedLoRAConv2d
    assert isinstance(grouped.conv2, expected)
    inputs, target = torch.randn(5, 1, 16, 16), torch.randint(0, 3, (5,))
    assert_members_equal_alone(networks, inputs, target)


@pytest.mark.parametrize("method", ["default", "dora"])
def test_embedding_adapters_group(method: str):
    configs = [
        LoRAConfig(rank=rank, alpha=2, target_modules=["embed", "head"], **METHODS[method])
        for rank in (1, 2)
    ]
    networks = members(Tokens, configs)
    inputs, target = torch.randint(0, 20, (7, 5)), torch.randint(0, 3, (7,))
    assert_members_equal_alone(networks, inputs, target)


def test_dropout_runs_each_members_own_layer_in_training():
    configs = [LoRAConfig(rank=2, alpha=2, dropout=0.3, use_dora=True) for _ in range(2)]
    networks = members(lambda: MLP(input_shape=(6,), num_classes=3, hidden_sizes=(5,)), configs)
    grouped = group_networks(networks)
    inputs = torch.randn(32, 6)
    grouped.train()
    out = grouped(inputs)
    assert not torch.equal(out[0], out[1])  # masks drawn per member
    grouped.eval()
    for network, out in zip(networks, grouped(inputs), strict=True):
        torch.testing.assert_close(out, network.eval()(inputs))


def test_share_frozen_keeps_pissa_members_on_their_own_residual():
    configs = [LoRAConfig(rank=r, alpha=2, **METHODS[m]) for r, m in ((1, "pissa"), (2, "default"))]
    configs.append(LoRAConfig(rank=3, alpha=2, init="pissa"))
    networks = members(lambda: MLP(input_shape=(6,), num_classes=4, hidden_sizes=(5,)), configs)
    probe = torch.randn(4, 6)
    before = [network(probe) for network in networks]
    share_frozen(networks)
    pissa, plain, other = (lora_layers(n)["hidden.0"] for n in networks)
    assert plain.base_layer.weight is lora_layers(networks[0])["hidden.0"].pretrained_weight or (
        torch.equal(plain.base_layer.weight, pissa.pretrained_weight)
    )
    assert not torch.equal(pissa.base_layer.weight, other.base_layer.weight)  # own residuals
    for network, output in zip(networks, before, strict=True):
        torch.testing.assert_close(network(probe), output)
    check_grouped(group_networks(networks), networks, probe)


def test_what_cannot_group_says_why():
    mlp = lambda: MLP(input_shape=(6,), num_classes=4, hidden_sizes=(5,))  # noqa: E731
    networks = members(mlp, [LoRAConfig(rank=1, alpha=1)] * 2)
    lora_layers(networks[1])["hidden.0"].merge()
    with pytest.raises(GroupingError, match=r"hidden.0 is merged"):
        check_groupable(networks)
    normed = members(lambda: nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), [LoRAConfig(1, 1)])
    with pytest.raises(GroupingError, match=r"1 is a batch norm"):
        check_groupable(normed)
    hidden = ["hidden.0"]
    mixed = members(
        mlp,
        [
            LoRAConfig(1, 1, target_modules=hidden),
            LoRAConfig(1, 1, target_modules=hidden, bias="all"),
        ],
    )
    with pytest.raises(GroupingError, match="train different modules"):
        check_groupable(mixed)
