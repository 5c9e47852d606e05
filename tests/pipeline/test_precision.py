"""bf16-mixed precision: a sweep end to end keeps fp32 adapters, and merging inside an
autocast region still computes in fp32."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file

from lora_lab.cli import main
from lora_lab.lora import LoRAConfig, inject_lora, load_adapter, lora_layers, merge_lora
from lora_lab.models import MLP, load_network_weights


def test_bf16_mixed_sweep_end_to_end_keeps_fp32_adapters(tmp_path: Path, tiny_overrides: list[str]):
    out = tmp_path / "study"
    overrides = [*tiny_overrides, "sweep.ranks=[2]"]
    assert main(["sweep", *overrides, "trainer.precision=bf16-mixed", f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert (table.status == "ok").all() and table.test_loss.notna().all()
    saved = load_file(out / "adapters" / "rank_2_seed_0" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in saved.values()} == {torch.float32}
    network = MLP()
    load_network_weights(network, out / "checkpoints" / "pretrain.safetensors")
    load_adapter(network, out / "adapters" / "rank_2_seed_0")
    inputs = torch.randn(4, 1, 28, 28)
    unmerged = network(inputs)
    merge_lora(network)
    torch.testing.assert_close(network(inputs), unmerged, rtol=1e-5, atol=1e-5)


def test_merge_inside_an_autocast_region_still_computes_in_fp32():
    def network() -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64))
        inject_lora(model, LoRAConfig(rank=4, alpha=8))
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight)
        return model

    reference, autocast = network(), network()
    merge_lora(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        merge_lora(autocast)
    torch.testing.assert_close(
        autocast[0].base_layer.weight, reference[0].base_layer.weight, rtol=0, atol=0
    )
