"""Sweep grids beyond rank: alphas, learning rates and seeds form a grid with the ranks, a
single value sets without renaming, and bad grid values are one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab.cli import main
from lora_lab.pipeline.plan import PlannedRun, plan
from tests.pipeline.study_config import composed


def lora_runs(*overrides: str) -> list[PlannedRun]:
    return [run for run in plan(composed(*overrides)) if run.stage == "lora"]


def test_default_sweep_keeps_its_names_and_identities():
    runs = lora_runs("sweep.ranks=[1,2]")
    assert [run.run_id for run in runs] == ["lora_r1_a1_s0", "lora_r2_a2_s0"]
    assert [run.adapter for run in runs] == ["rank_1_seed_0", "rank_2_seed_0"]
    assert [run.label() for run in runs] == ["lora rank=1 seed=0", "lora rank=2 seed=0"]
    # Empty lists mean "not swept", like null: the same runs, the same identities.
    same = lora_runs("sweep.ranks=[1,2]", "sweep.alphas=[]", "sweep.learning_rates=[]")
    assert [r.identity for r in same] == [r.identity for r in runs]


def test_alphas_learning_rates_and_seeds_form_a_grid_with_ranks():
    runs = plan(
        composed(
            "sweep.ranks=[1,2]",
            "sweep.alphas=[4,16]",
            "sweep.learning_rates=[1e-3,1e-2]",
            "sweep.seeds=[0,1]",
        )
    )
    pretrain, *rest = runs
    full = [run for run in rest if run.stage == "full_finetune"]
    lora = [run for run in rest if run.stage == "lora"]
    # with seeds swept, the baseline runs once per seed (the recommended rank compares them)
    assert [r.run_id for r in full] == ["full_finetune_s0", "full_finetune_s1"]
    assert len(lora) == 2 * 2 * 2 * 2
    assert {(r.rank, r.alpha, r.learning_rate, r.seed) for r in lora} == {
        (rank, alpha, lr, seed)
        for rank in (1, 2)
        for alpha in (4.0, 16.0)
        for lr in (1e-3, 1e-2)
        for seed in (0, 1)
    }
    for run in lora:
        assert run.cfg.lora.alpha == run.alpha and run.cfg.lora.rank == run.rank
        assert run.cfg.module.optimizer.lr == run.learning_rate
        assert run.run_id == f"lora_r{run.rank}_a{run.alpha:g}_lr{run.learning_rate:g}_s{run.seed}"
        assert run.adapter == (
            f"rank_{run.rank}_seed_{run.seed}_alpha_{run.alpha:g}_lr_{run.learning_rate:g}"
        )
    assert len({r.run_id for r in runs}) == len(runs)
    assert len({r.identity for r in runs}) == len(runs)
    assert len({r.adapter for r in lora}) == len(lora)
    # The learning-rate grid is the LoRA stage's; the other stages keep theirs.
    assert pretrain.cfg.module.optimizer.lr == full[0].cfg.module.optimizer.lr == 1e-3
    assert lora[0].label() == "lora rank=1 alpha=4 lr=0.001 seed=0"


def test_auto_seeds_start_with_three_seeds_named_as_a_list_would_name_them():
    auto = plan(composed("sweep.ranks=[2]", "sweep.seeds=auto"))
    listed = plan(composed("sweep.ranks=[2]", "sweep.seeds=[0,1,2]"))
    assert [(r.run_id, r.identity) for r in auto] == [(r.run_id, r.identity) for r in listed]


def test_a_single_value_sets_without_renaming():
    runs = lora_runs("sweep.ranks=[1,2]", "sweep.alphas=[8]", "sweep.learning_rates=[0.01]")
    assert [run.run_id for run in runs] == ["lora_r1_a8_s0", "lora_r2_a8_s0"]
    assert [run.adapter for run in runs] == ["rank_1_seed_0", "rank_2_seed_0"]
    assert all(r.cfg.lora.alpha == 8 and r.cfg.module.optimizer.lr == 0.01 for r in runs)


BAD_GRID = {
    "sweep.learning_rates=[0.001,-1]": "sweep.learning_rates=[0.001, -1] is not allowed: it holds -1",
    "sweep.learning_rates=0.01": "must be a list",
    "sweep.alphas=[abc]": "sweep.alphas=['abc'] is not allowed: it must be a list, each a finite",
    "sweep.jobs=0": "sweep.jobs=0 is not allowed: it must be an integer ≥ 1",
    "sweep.jobs=1.5": "sweep.jobs=1.5 is not allowed: it must be an integer ≥ 1",
    "sweep.ranks=[1,1]": "lora_r1_a1_s0",
    "sweep.seeds=abc": "sweep.seeds='abc' is not allowed: it must be a list of integers or one of auto",
    "sweep.lr_extend=1.5": "sweep.lr_extend=1.5 is not allowed: it must be an integer ≥ 0",
    "report.max_seeds=2": "report.max_seeds=2 is not allowed: it must be an integer ≥ 3",
}


@pytest.mark.parametrize("bad", list(BAD_GRID))
def test_bad_grid_values_are_one_line_errors(bad: str, tmp_path: Path, tiny_overrides, capsys):
    out = tmp_path / "study"
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-lab: error:") and "\n" not in err, err
    assert BAD_GRID[bad] in err
    assert not out.exists()
