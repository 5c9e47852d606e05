"""`lora_lab.lora` on fake CUDA tensors (tests/fake_cuda.py): injected layers of every method
and layer type, their merge and unmerge, the grouped (fused) maths, and the contents of an
adapter file taken from CUDA tensors all stay on the device, or land on the host where a file
needs them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_lab.lora import LoRAConfig, inject_lora, merge_lora, unmerge_lora
from lora_lab.lora.adapter_io import adapter_file_contents
from lora_lab.lora.grouped import cross_entropy_per_adapter, group_networks
from tests.fake_cuda import CUDA, fake_cuda, on_cuda, to_fake_cuda
from tests.lora.testkit import ConvNet


class Mixed(nn.Module):
    """Every layer type LoRA wraps: an embedding, a convolution and linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(6 + 4, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.relu(self.conv(images)).mean(dim=(2, 3))
        hidden = torch.cat([self.embed(tokens).mean(dim=1), pooled], dim=1)
        return self.head(torch.relu(self.fc(hidden)))


METHODS = {
    "default": {},
    "rslora": {"use_rslora": True},
    "gaussian": {"init": "gaussian"},
    "dora": {"use_dora": True},
    "pissa": {"init": "pissa"},
}


def adapted(method: str) -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    targets = ["fc", "head"] if method == "pissa" else ["embed", "conv", "fc", "head"]
    config = LoRAConfig(rank=2, alpha=4, dropout=0.1, target_modules=targets, **METHODS[method])
    inject_lora(model, config)
    return model


def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randint(0, 11, (5, 7), device=CUDA), torch.randn(5, 3, 6, 6, device=CUDA)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_adapted_model_runs_merges_and_unmerges_on_the_device(method: str):
    model = adapted(method)
    with fake_cuda():
        to_fake_cuda(model)
        model.train()  # dropout masks drawn on the device
        assert on_cuda(model(*inputs()))
        merge_lora(model)
        merge_lora(model)  # idempotent
        model.eval()
        assert on_cuda(model(*inputs()))
        unmerge_lora(model)
        assert on_cuda(*model.parameters(), *model.buffers())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_an_adapter_file_from_cuda_tensors_holds_host_tensors(method: str):
    """The file is written from host copies (safetensors writes bytes from memory; fake
    tensors have none, so the write itself is the host's part, tested in test_lora_io)."""
    model = adapted(method)
    with fake_cuda():
        to_fake_cuda(model)
        tensors, config = adapter_file_contents(model)
    assert tensors and all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    expected_rank = 4 if method == "pissa" else 2  # PiSSA converts to a rank-2r LoRA
    assert config["r"] == expected_rank
    assert tensors["base_model.model.fc.lora_A.weight"].shape == (expected_rank, 10)


def test_grouped_adapters_and_their_loss_run_on_the_device():
    torch.manual_seed(0)
    base = ConvNet()
    networks = []
    for rank in (1, 2, 4):
        network = copy.deepcopy(base)
        inject_lora(network, LoRAConfig(rank=rank, alpha=rank, dropout=0.1))
        networks.append(network)
    grouped = group_networks(networks)
    with fake_cuda():
        # The adapters live in their own networks (the fused module holds them as members)
        to_fake_cuda(nn.ModuleList([*networks, grouped]))
        grouped.train()
        logits = grouped(torch.randn(6, 3, 8, 8, device=CUDA))  # [K, B, C]
        target = torch.randint(0, 4, (6,), device=CUDA)
        losses = cross_entropy_per_adapter(logits, target)
        assert logits.shape == (3, 6, 4) and losses.shape == (3,)
        assert on_cuda(logits, losses)
