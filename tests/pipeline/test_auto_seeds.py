"""A study that grows: `sweep.seeds=auto` adds seed rounds (fused) up to `report.max_seeds`
and resumes like any other study; `sweep.lr_extend` steps past a grid's edge choice."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.cli import main
from lora_lab.pipeline.rounds import next_learning_rate
from lora_lab.report.selection import chosen_learning_rates
from lora_lab.results import read_results
from tests.pipeline.study_config import tiny_study_overrides

# On the tiny data, r=4 ends about 10 points below the full finetune with a spread of a few
# points: a tolerance of 10 points sits inside its interval, so every round leaves it open.
AUTO = ["sweep.ranks=[1,4]", "sweep.seeds=auto", "report.max_seeds=4", "report.tolerance=0.1",
        "sweep.lr_extend=0"]  # fmt: skip


def verdict_table(study: Path) -> str:
    report = (study / "report.md").read_text()
    start = report.index("## Recommended rank")
    return report[start : report.index("\n## ", start + 1)]


@pytest.fixture(scope="module")
def auto_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    folder = tmp_path_factory.mktemp("auto")
    args = ["sweep", *tiny_study_overrides(folder), f"output_dir={folder / 'study'}", *AUTO]
    assert main(args) == 0
    return folder / "study", args, (folder / "study" / "lora-lab.log").read_text()


def test_auto_seeds_add_fused_rounds_up_to_max_seeds(auto_study):
    study, _, log = auto_study
    assert "auto seeds: r=1 and r=4 unsettled after 3 seeds; adding seed 3" in log
    assert "still unsettled after 4 seeds, the bound (report.max_seeds=4)" in log
    assert "fused: lora ranks 1,4 seed 3: 2 runs train in one pass" in log
    df = read_results(study / "results.csv")
    assert sorted(df[df["stage"] == "full_finetune"]["seed"]) == [0, 1, 2, 3]
    assert sorted(df[df["stage"] == "lora"]["seed"]) == [0, 0, 1, 1, 2, 2, 3, 3]
    table = verdict_table(study)
    assert "| settled |" in table and "| 4 / 4 |" in table
    assert "| no |" in table  # the tested rank is marked unsettled


def test_an_auto_study_resumes_without_rerunning_a_finished_run(auto_study, capsys):
    study, args, _ = auto_study
    copy = study.parent / "copy"
    shutil.copytree(study, copy)
    before = verdict_table(copy)
    rerun = [a for a in args if not a.startswith("output_dir=")] + [f"output_dir={copy}"]
    capsys.readouterr()
    assert main(rerun) == 0  # everything on disk: every round is taken again, nothing trains
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 13 and " … eta " not in err
    assert verdict_table(copy) == before
    # The last round lost (an interruption before it): only its runs train again.
    for run in ("full_finetune_s3", "lora_r1_a1_s3", "lora_r4_a4_s3"):
        shutil.rmtree(copy / "runs" / run)
    assert main(rerun) == 0
    err = capsys.readouterr().err
    assert err.count("done earlier, skipped") == 10 and err.count(" … eta ") == 2
    assert "adding seed 3" in err
    assert verdict_table(copy) == before


def test_an_edge_choice_extends_its_grid(tmp_path: Path, tiny_overrides, capsys):
    grid = [1e-3, 3e-3]
    out = tmp_path / "study"
    extend = ["sweep.ranks=[1,4]", "sweep.learning_rates=[1e-3,3e-3]", "sweep.lr_extend=1"]
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", *extend]) == 0
    log = capsys.readouterr().err
    df = read_results(out / "results.csv")
    lora = df[df["stage"] == "lora"]
    planned = lora[lora["learning_rate"].isin(grid)]
    for rank, chosen in chosen_learning_rates(planned).set_index("rank")["learning_rate"].items():
        expected = next_learning_rate(grid, top=chosen == grid[-1])  # the edge it chose
        tried = sorted(lora[lora["rank"] == rank]["learning_rate"])
        assert tried == sorted([*grid, expected]), (rank, tried)
        assert f"lr grid: lora rank={int(rank)} chose lr={chosen:g}" in log
    final = chosen_learning_rates(df)
    still = final[final["at_edge"] & (final["stage"] == "lora")]
    assert len(still)  # (r=1 barely moves in two steps: its tie keeps the smallest value)
    assert "a bound, not an optimum" in (out / "report.md").read_text()


def test_lr_extend_0_adds_nothing(tmp_path: Path, tiny_overrides, capsys):
    out = tmp_path / "study"
    grid = ["sweep.ranks=[1,4]", "sweep.learning_rates=[1e-3,3e-3]", "sweep.lr_extend=0"]
    assert main(["sweep", *tiny_overrides, f"output_dir={out}", *grid]) == 0
    assert "lr grid:" not in capsys.readouterr().err
    df = pd.read_csv(out / "results.csv")
    assert sorted(set(df[df["stage"] == "lora"]["learning_rate"])) == [1e-3, 3e-3]
