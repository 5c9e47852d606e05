"""Multi-device training (`trainer=ddp`): the trainer configs compose, a LoRA backward pass
leaves no trainable parameter without a gradient, and a sweep on two CPU processes keeps every
replica's weights the same."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.utils import instantiate

from lora_lab.cli import main
from lora_lab.lora import LoRAConfig, load_adapter, lora_layers
from lora_lab.models import MLP, LoRAClassifierModule, load_network_weights
from lora_lab.pipeline.parallel import REPLICAS_FILE, trainable_digest
from tests.pipeline.study_config import composed


def test_ddp_gpu_and_auto_trainer_configs_compose():
    ddp = composed("trainer=ddp").trainer
    assert ddp.strategy._target_ == "lightning.pytorch.strategies.DDPStrategy"
    assert ddp.strategy.start_method == "spawn"
    assert ddp.strategy.find_unused_parameters is False
    assert ddp.accelerator == "auto" and ddp.devices == 2
    assert composed("trainer=gpu").trainer.accelerator == "gpu"
    on_gpus = composed("trainer=ddp", "trainer.accelerator=gpu", "trainer.devices=4").trainer
    assert on_gpus.accelerator == "gpu" and on_gpus.devices == 4
    # accelerator=auto picks what is there: the CPU here, a GPU on a CUDA machine.
    auto = instantiate(composed("trainer.accelerator=auto").trainer, logger=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert auto.strategy.root_device.type == expected


def test_lora_trains_every_adapter_and_nothing_frozen():
    """Why DDP needs no `find_unused_parameters`: a backward pass gives every parameter that
    requires grad a gradient, and everything else has requires_grad=False."""
    module = LoRAClassifierModule(
        network=MLP(),
        lora=LoRAConfig(rank=2, alpha=2),
        optimizer=torch.optim.Adam,
    )
    images, labels = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    module.on_train_epoch_start()
    module.training_step((images, labels), 0).backward()
    trainable = {id(p) for p in module.parameters() if p.requires_grad}
    adapters = {
        id(p) for layer in lora_layers(module.network).values() for p in layer.adapter_parameters()
    }
    assert trainable == adapters and len(adapters) == 6  # A and B of 3 Linear layers
    assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)


@pytest.mark.slow
@pytest.mark.parametrize("fused", [False, True], ids=["sequential", "fused"])
def test_ddp_sweep_on_two_cpu_processes(tmp_path: Path, tiny_overrides: list[str], fused: bool):
    out = tmp_path / "study"
    overrides = [*tiny_overrides, "sweep.ranks=[1,2]", "trainer=ddp", f"sweep.fused={fused}"]
    assert main(["sweep", *overrides, f"output_dir={out}"]) == 0
    table = pd.read_csv(out / "results.csv")
    assert table.run_id.tolist() == ["pretrain", "full_finetune", "lora_r1_a1_s0", "lora_r2_a2_s0"]
    assert (table.status == "ok").all() and (table.epochs == 1).all()
    assert table.per_class_acc.map(lambda text: len(json.loads(text)) == 10).all()
    # A fused pass trains its members under one Trainer: one replica check for the pass.
    checked = [*table.run_dir[:2], *sorted(out.glob("passes/*"))] if fused else table.run_dir
    assert table["pass"].nunique() == (3 if fused else 4)
    for run_dir in checked:
        replicas = json.loads((out / run_dir / REPLICAS_FILE).read_text())
        assert replicas["world_size"] == 2
        assert len(set(replicas["digests"])) == 1, "the processes' trainable weights differ"
    # The adapter rank 0 saved is the one every process trained.
    for rank in (1, 2) if not fused else ():
        network = MLP()
        load_network_weights(network, out / "checkpoints" / "pretrain.safetensors")
        load_adapter(network, out / "adapters" / f"rank_{rank}_seed_0")
        replicas = json.loads(
            (out / "runs" / f"lora_r{rank}_a{rank}_s0" / REPLICAS_FILE).read_text()
        )
        assert trainable_digest(network) == replicas["digests"][0]
    # One process wrote: one result per run, nothing per rank (no extra folders or logs).
    assert sorted(p.name for p in (out / "runs").iterdir()) == sorted(table.run_id)
    assert len(list(out.rglob("result.json"))) == 4
    assert len(list(out.rglob("metrics.csv"))) == 4
    assert not list(out.rglob("lightning_logs")) and not list(out.rglob("version_*"))
