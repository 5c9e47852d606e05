"""Diverged runs: a non-finite training loss or a validation accuracy at chance gives status
`diverged` (fused and sequential), a result that never wins a choice and never fails the
study."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lora_lab.cli import main
from lora_lab.data.fakes import write_fake_mnist
from lora_lab.pipeline.record import CHANCE_MARGIN, divergence


def test_the_chance_rule_on_fixed_numbers():
    chance = 1 / 5
    assert divergence("lora", chance + CHANCE_MARGIN, 1.0, chance).startswith("validation")
    assert divergence("lora", chance + CHANCE_MARGIN + 0.01, 1.0, chance) == ""
    assert divergence("full_finetune", 0.1, 1.0, chance) != ""
    assert divergence("pretrain", 0.1, 1.0, chance) == ""  # the rule is the finetune stages'
    assert divergence("lora", None, 1.0, None) == ""  # regression: no accuracy, no chance
    assert divergence("pretrain", 0.9, float("nan"), chance) == "test loss is not finite"


@pytest.mark.parametrize("fused", ["true", "false"])
def test_a_non_finite_loss_diverges_and_never_wins(fused: str, tmp_path: Path, tiny_overrides):
    out = tmp_path / "study"
    grid = "sweep.learning_rates=[1e-3,1e30]"
    code = main(["sweep", *tiny_overrides, f"output_dir={out}", "sweep.ranks=[2]", grid,
                 f"sweep.fused={fused}"])  # fmt: skip
    assert code == 0  # a diverged run is a result, not a crash
    df = pd.read_csv(out / "results.csv")
    huge = df[df["learning_rate"] == 1e30].iloc[0]
    assert huge["status"] == "diverged" and huge["error"].startswith("FloatingPointError")
    assert not huge["selected"]
    lora = df[df["stage"] == "lora"]
    assert lora[lora["selected"]]["learning_rate"].tolist() == [1e-3]


@pytest.mark.parametrize("fused", ["true", "false"])
def test_a_run_at_chance_diverges(fused: str, tmp_path: Path, tiny_overrides, capsys):
    noise = write_fake_mnist(tmp_path / "noise", n_train=600, n_test=100, learnable=False)
    out = tmp_path / "study"
    code = main(["sweep", *tiny_overrides, f"data.root={noise}", f"output_dir={out}",
                 "sweep.ranks=[1,2]", f"sweep.fused={fused}"])  # fmt: skip
    assert code == 0
    df = pd.read_csv(out / "results.csv").set_index("stage")
    finetuned = df.loc[["full_finetune", "lora"]]
    assert finetuned["status"].eq("diverged").all()
    assert finetuned["error"].str.contains("at chance").all()
    assert df.loc["pretrain", "status"] == "ok"  # the chance rule is the finetune stages'
    assert "3 run(s) diverged" in capsys.readouterr().err
