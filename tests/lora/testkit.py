"""Tiny models and helpers shared by the tests/lora suite."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lora_lab.lora import lora_layers
from lora_lab.lora.inject import adapter_state


class MLP(nn.Module):
    """6 -> 12 -> 12 -> 4 with ReLU; layers fc1, fc2, head."""

    def __init__(self, in_dim: int = 6, hidden: int = 12, out_dim: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class ConvNet(nn.Module):
    """[N, 3, 8, 8] -> logits [N, 4]; conv1 (3x3, pad 1), conv2 (3x3, stride 2), head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 6, 3, stride=2)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(hidden.mean(dim=(2, 3)))


class EmbedNet(nn.Module):
    """Token ids [N, T] -> logits [N, 3]; emb (padding_idx 0), fc, head."""

    def __init__(self, vocab: int = 30, dim: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.fc = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc(self.emb(tokens))).mean(dim=1))


def make_model(kind: str, seed: int = 0) -> nn.Module:
    """A freshly initialised tiny model: "mlp", "conv" or "embed"."""
    torch.manual_seed(seed)
    return {"mlp": MLP, "conv": ConvNet, "embed": EmbedNet}[kind]()


def make_input(kind: str, seed: int = 1, batch: int = 5) -> torch.Tensor:
    """A batch that fits `make_model(kind)`."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        return torch.randn(batch, 6, generator=generator)
    if kind == "conv":
        return torch.randn(batch, 3, 8, 8, generator=generator)
    return torch.randint(0, 30, (batch, 7), generator=generator)


def perturb_adapters(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Give every adapter factor random values, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything a failed load must not change: tensors, structure, grad flags, config."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "adapter": adapter_state(model),
    }


def assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Bit-exact comparison of two `snapshot`s."""
    assert before["types"] == after["types"]
    assert before["grad"] == after["grad"]
    assert before["adapter"] == after["adapter"]
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key


def nudge_adapters(model: nn.Module, seed: int = 0, scale: float = 0.3) -> None:
    """Add random noise to every adapter tensor (DoRA magnitudes included), keeping its init.

    Unlike `perturb_adapters` the values stay near the trained-from point, so a DoRA magnitude
    stays near the row norms and a PiSSA factor near its SVD init.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for param in layer.adapter_parameters():
                param.add_(torch.randn(param.shape, generator=generator) * scale)
