"""One fast end-to-end `lora-lab sweep` on tiny data, checked from the files it writes."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from matplotlib.image import imread

from lora_lab.cli import main
from lora_lab.lora import load_adapter, lora_layers
from lora_lab.models import MLP, load_network_weights
from tests.pipeline.study_config import tiny_study_overrides

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("e2e")
    out = folder / "study"
    assert (
        main(["sweep", f"output_dir={out}", "sweep.ranks=[1,2]", *tiny_study_overrides(folder)])
        == 0
    )
    return out


def test_sweep_writes_one_row_per_run(study: Path):
    table = pd.read_csv(study / "results.csv")
    assert list(table.stage) == ["pretrain", "full_finetune", "lora", "lora"]
    assert table.loc[table.stage == "lora", "rank"].tolist() == [1, 2]
    assert (table.status == "ok").all()
    assert (table.epochs == 1).all()  # trainer.max_epochs=1 took effect in every stage
    assert table.test_acc.between(0, 1).all()
    assert table.test_loss.notna().all()
    for run_dir in table.run_dir:
        assert (study / run_dir / "result.json").is_file()
        assert (study / run_dir / "logs" / "metrics.csv").is_file()
    per_class = json.loads(table.per_class_acc[0])
    assert len(per_class) == 10 and "Ankle boot" in per_class


def test_sweep_parameter_counts(study: Path):
    table = pd.read_csv(study / "results.csv").set_index("run_id")
    total = sum(p.numel() for p in MLP().parameters())  # 784-64-64-10 = 55050
    full = table.loc["full_finetune"]
    assert full.trainable_params == full.total_params == total
    for rank in (1, 2):
        row = table.loc[f"lora_r{rank}_a{rank}_s0"]
        # r·(in+out) per wrapped Linear: 784→64, 64→64, 64→10 (all-linear includes the head)
        expected = rank * ((784 + 64) + (64 + 64) + (64 + 10))
        assert row.trainable_params == expected
        assert row.total_params == total + expected


def test_sweep_plot_is_a_real_png(study: Path):
    path = study / "accuracy_vs_rank.png"
    assert path.read_bytes()[:8] == PNG_MAGIC
    height, width = imread(path).shape[:2]
    assert height > 200 and width > 200
    assert (study / "report.md").is_file()
    assert (study / ".hydra" / "config.yaml").is_file()


def test_sweep_adapters_load_and_reproduce_the_run(study: Path):
    for rank in (1, 2):
        network = MLP()
        load_network_weights(network, study / "checkpoints" / "pretrain.safetensors")
        base_out = network(torch.ones(2, 1, 28, 28))
        load_adapter(network, study / "adapters" / f"rank_{rank}_seed_0")
        layers = lora_layers(network)
        assert sorted(layers) == ["head", "hidden.0", "hidden.1"]
        assert all(layer.rank == rank for layer in layers.values())
        # trained adapters moved the outputs away from the pretrained network's
        assert not torch.allclose(network(torch.ones(2, 1, 28, 28)), base_out)


def test_full_finetune_starts_from_pretrain_and_changes_all_weights(study: Path):
    from safetensors.torch import load_file

    pre = load_file(study / "checkpoints" / "pretrain.safetensors")
    full = load_file(study / "checkpoints" / "full_finetune.safetensors")
    assert pre.keys() == full.keys()
    assert all(not torch.equal(pre[k], full[k]) for k in pre)
