"""The accelerator users expect: Lightning's `auto` by default, explicit choices kept, and a
study that says first what it trains on."""

from __future__ import annotations

from pathlib import Path

import torch

from lora_lab.cli import main
from lora_lab.pipeline.builders import devices_of
from tests.pipeline.study_config import composed, tiny_study_overrides

HERE = "cuda:0" if torch.cuda.is_available() else "cpu"


def test_the_default_trainer_lets_lightning_choose_and_cpu_and_gpu_stay_choices():
    assert composed().trainer.accelerator == "auto"
    assert composed("trainer=cpu").trainer.accelerator == "cpu"
    assert composed("trainer=gpu").trainer.accelerator == "gpu"
    assert composed("trainer=debug").trainer.accelerator == "auto"


def test_devices_of_names_what_lightning_resolved():
    assert devices_of(composed().trainer) == f"{HERE}, precision 32-true"
    bf16 = composed("trainer=cpu", "trainer.precision=bf16-mixed").trainer
    assert devices_of(bf16) == "cpu, precision bf16-mixed"
    ddp = composed("trainer=ddp", "trainer.accelerator=cpu").trainer
    assert devices_of(ddp) == "2 × cpu (DDPStrategy), precision 32-true"


def test_a_study_says_first_what_it_trains_on(tmp_path: Path, capsys):
    out = tmp_path / "study"
    args = ["sweep", *tiny_study_overrides(tmp_path), f"output_dir={out}", "sweep.ranks=[1]"]
    assert main([*args, "+stages.lora.trainer.precision=bf16-mixed"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[:2] == [
        f"training pretrain, full_finetune on {HERE}, precision 32-true",
        f"training lora on {HERE}, precision bf16-mixed",
    ]
