"""count_parameters and parameter_summary."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lora_lab.lora import LoRAConfig, count_parameters, inject_lora, parameter_summary
from lora_lab.lora.params import full_rank_at
from lora_lab.models import ConvNet
from tests.lora.testkit import make_model


def test_counts_of_a_plain_model() -> None:
    model = make_model("mlp")
    total = (6 * 12 + 12) + (12 * 12 + 12) + (12 * 4 + 4)
    assert count_parameters(model) == {"trainable": total, "frozen": 0, "total": total}


def test_shared_parameters_count_once() -> None:
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    model[1].weight = model[0].weight
    assert count_parameters(model)["total"] == 16


@settings(max_examples=25, deadline=None)
@given(
    dims=st.lists(st.integers(1, 20), min_size=2, max_size=5),
    rank=st.integers(1, 16),
)
def test_trainable_count_is_the_formula_sum(dims: list[int], rank: int) -> None:
    layers = [nn.Linear(a, b) for a, b in itertools.pairwise(dims)]
    model = nn.Sequential(*layers, nn.Embedding(7, dims[-1]), nn.Conv2d(2, 3, (3, 2)))
    base_total = sum(p.numel() for p in model.parameters())
    inject_lora(model, LoRAConfig(rank=rank, alpha=1, target_modules=r"\d+"))
    expected = sum(rank * (a + b) for a, b in itertools.pairwise(dims))
    expected += rank * (7 + dims[-1])  # embedding: A [r, num], B [dim, r]
    expected += rank * (2 * 3 * 2) + 3 * rank  # conv: A [r, in, kh, kw], B [out, r, 1, 1]
    counts = count_parameters(model)
    assert counts["trainable"] == expected
    assert counts["frozen"] == base_total


def test_summary_lists_every_parameter_and_totals() -> None:
    model = make_model("mlp")
    inject_lora(model, LoRAConfig(rank=2, alpha=2, modules_to_save=["head"]))
    text = parameter_summary(model)
    lines = text.splitlines()
    assert lines[0].split() == ["name", "shape", "status", "count"]
    assert any(
        line.split() == ["fc1.lora_A.weight", "[2,", "6]", "trainable", "12"] for line in lines
    )
    assert any(
        line.split()[:2] == ["fc1.base_layer.weight", "[12,"] and "frozen" in line for line in lines
    )
    counts = count_parameters(model)
    share = 100 * counts["trainable"] / counts["total"]
    assert f"trainable: {counts['trainable']:,} of {counts['total']:,} ({share:.3f}%)" in text
    assert f"{counts['total'] * 4 / 1e6:.3f} MB total" in text


def test_full_rank_at_is_the_largest_min_out_in_of_the_adapted_layers() -> None:
    # ConvNet: conv1 [6, 1, 5, 5] → min(6, 25) = 6; conv2 [16, 6, 5, 5] → min(16, 150) = 16;
    # fc1 [120, 256] → 120; fc2 [84, 120] → 84; head [10, 84] → 10.
    expected = {("conv1",): 6, ("conv2", "head"): 16, ("conv2", "fc1", "fc2", "head"): 120}
    for targets, rank in expected.items():
        network = ConvNet()
        assert full_rank_at(network) is None  # nothing adapted
        inject_lora(network, LoRAConfig(rank=2, alpha=2, target_modules=list(targets)))
        assert full_rank_at(network) == rank
    embedding = nn.Sequential(nn.Embedding(50, 8))
    inject_lora(embedding, LoRAConfig(rank=2, alpha=2, target_modules=["0"]))
    assert full_rank_at(embedding) == 8  # [num_embeddings, dim] = [50, 8]
