"""LoRA layer invariants: zero-init, shapes, parameter formulas, merge equivalence, properties."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.lora import LoRAConv2d, LoRAEmbedding, LoRALinear, lora_delta_weight

SETTINGS = settings(max_examples=25, deadline=None)


def _randomize(layer: nn.Module, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in layer.adapter_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


@SETTINGS
@given(
    in_dim=st.integers(1, 24),
    out_dim=st.integers(1, 24),
    rank=st.integers(1, 32),
    batch=st.integers(1, 6),
    alpha=st.floats(0.5, 32.0),
    rslora=st.booleans(),
)
def test_linear_properties(
    in_dim: int, out_dim: int, rank: int, batch: int, alpha: float, rslora: bool
) -> None:
    torch.manual_seed(0)
    base = nn.Linear(in_dim, out_dim)
    x = torch.randn(batch, 3, in_dim)
    expected = base(x)
    layer = LoRALinear(base, rank, alpha, use_rslora=rslora)
    assert layer.base_layer is base and not base.weight.requires_grad
    assert torch.equal(layer(x), expected)  # B = 0: a fresh adapter changes nothing
    assert layer.lora_A.weight.shape == (rank, in_dim)
    assert layer.lora_B.weight.shape == (out_dim, rank)
    assert sum(p.numel() for p in layer.adapter_parameters()) == rank * (in_dim + out_dim)
    assert layer.scaling == pytest.approx(alpha / (math.sqrt(rank) if rslora else rank))

    _randomize(layer)
    unmerged = layer(x)
    reference = expected + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * layer.scaling
    torch.testing.assert_close(unmerged, reference, rtol=1e-5, atol=1e-5)
    assert lora_delta_weight(layer).shape == base.weight.shape
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


@SETTINGS
@given(
    in_ch=st.integers(1, 5),
    out_ch=st.integers(1, 5),
    rank=st.integers(1, 8),
    kernel=st.sampled_from([1, 2, 3]),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    batch=st.integers(1, 3),
)
def test_conv2d_properties(
    in_ch: int,
    out_ch: int,
    rank: int,
    kernel: int,
    stride: int,
    padding: int,
    dilation: int,
    batch: int,
) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation)
    x = torch.randn(batch, in_ch, 7, 7)
    expected = base(x)
    layer = LoRAConv2d(base, rank, alpha=4.0)
    assert torch.equal(layer(x), expected)
    assert layer.lora_A.weight.shape == (rank, in_ch, kernel, kernel)
    assert layer.lora_B.weight.shape == (out_ch, rank, 1, 1)
    count = sum(p.numel() for p in layer.adapter_parameters())
    assert count == rank * (in_ch * kernel * kernel) + out_ch * rank

    _randomize(layer)
    unmerged = layer(x)
    delta = lora_delta_weight(layer)
    assert delta.shape == base.weight.shape
    # The adapter path must equal a conv with ΔW (same geometry): this pins the merge formula.
    direct = nn.functional.conv2d(x, delta, None, stride, padding, dilation)
    torch.testing.assert_close(unmerged - expected, direct, rtol=1e-4, atol=1e-5)
    assert torch.linalg.matrix_rank(delta.flatten(1)) <= rank
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


@SETTINGS
@given(
    vocab=st.integers(2, 40),
    dim=st.integers(1, 16),
    rank=st.integers(1, 16),
    batch=st.integers(1, 4),
    padding=st.booleans(),
)
def test_embedding_properties(vocab: int, dim: int, rank: int, batch: int, padding: bool) -> None:
    torch.manual_seed(0)
    base = nn.Embedding(vocab, dim, padding_idx=0 if padding else None)
    tokens = torch.randint(0, vocab, (batch, 5))
    expected = base(tokens)
    layer = LoRAEmbedding(base, rank, alpha=2.0)
    assert torch.equal(layer(tokens), expected)
    assert layer.lora_embedding_A.shape == (rank, vocab)
    assert layer.lora_embedding_B.shape == (dim, rank)
    assert torch.count_nonzero(layer.lora_embedding_A) == 0  # PEFT: A zeros, B normal
    assert sum(p.numel() for p in layer.adapter_parameters()) == rank * (vocab + dim)

    _randomize(layer)
    unmerged = layer(tokens)
    delta = lora_delta_weight(layer)
    assert delta.shape == (vocab, dim)
    torch.testing.assert_close(unmerged, expected + delta[tokens], rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(layer(tokens), unmerged, rtol=0, atol=1e-5)


def test_gaussian_init_matches_peft_std() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), rank=4, alpha=4, init="gaussian")
    assert layer.lora_A.weight.std().item() == pytest.approx(1 / 4, rel=0.05)
    assert torch.count_nonzero(layer.lora_B.weight) == 0


def test_kaiming_init_bound() -> None:
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(100, 10), rank=4, alpha=4)
    bound = 1 / math.sqrt(100)  # kaiming_uniform(a=√5) gives U(-1/√fan_in, 1/√fan_in)
    assert layer.lora_A.weight.abs().max().item() <= bound
    assert layer.lora_A.weight.abs().max().item() > 0.9 * bound


def test_dropout_is_only_on_the_adapter_path() -> None:
    torch.manual_seed(0)
    base = nn.Linear(8, 8)
    layer = LoRALinear(base, rank=2, alpha=2, dropout=0.5)
    assert isinstance(layer.lora_dropout, nn.Dropout)
    assert isinstance(LoRALinear(nn.Linear(2, 2), 1, 1).lora_dropout, nn.Identity)
    x = torch.randn(64, 8)
    layer.train()
    # With B = 0 the dropped adapter contributes nothing: the base path is never dropped.
    assert torch.equal(layer(x), base(x))
    _randomize(layer)
    torch.manual_seed(1)
    first = layer(x)
    torch.manual_seed(2)
    assert not torch.equal(first, layer(x))  # dropout is active in train mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_grouped_conv_is_refused() -> None:
    with pytest.raises(ValueError, match=r"grouped Conv2d \(groups=2\) is not supported"):
        LoRAConv2d(nn.Conv2d(4, 4, 3, groups=2), rank=2, alpha=2)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_conv_padding_modes_merge_consistently(padding_mode: str) -> None:
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode=padding_mode)
    x = torch.randn(2, 3, 6, 6)
    layer = LoRAConv2d(base, rank=2, alpha=2)
    assert torch.equal(layer(x), base(x))
    _randomize(layer)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)


def test_adapter_params_follow_base_dtype() -> None:
    layer = LoRALinear(nn.Linear(4, 4, dtype=torch.bfloat16), rank=2, alpha=2)
    assert layer.lora_A.weight.dtype == torch.bfloat16
    assert layer(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16
