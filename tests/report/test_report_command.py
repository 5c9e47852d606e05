"""`lora-lab report` on a results table alone: a bare .csv file, or a folder holding only one."""

from __future__ import annotations

from pathlib import Path

from lora_lab.cli import main
from lora_lab.results import RESULTS_CSV
from tests.report.fakes import make_results


def test_report_on_a_bare_results_table_writes_beside_it(tmp_path: Path, capsys) -> None:
    # Default fake study: full finetune 0.90, 0.91, 0.92; LoRA r=16 0.86, 0.865, 0.87: gap
    # 0.045 ≥ 0.01 (r=16 trains 2,400 < 100,000 parameters): the sequence stops at r=16.
    # 19 rows: one pretrain, then 3 seeds × (1 full finetune + 5 ranks).
    table = tmp_path / "merged.csv"
    make_results().to_csv(table, index=False)
    before = table.read_bytes()
    assert main(["report", str(table)]) == 0
    assert f"19 runs from {table} → {tmp_path / 'report.md'}" in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert "## Recommended rank" in text and "**Rule:** a rank is recommended when" in text
    assert (
        "recommended rank: none; the sequence stopped at its first rank, r=16: 4.50 points" in text
    )
    assert (tmp_path / "accuracy_vs_rank.png").is_file()
    assert table.read_bytes() == before  # the table is the input: never rewritten


def test_report_on_a_folder_holding_only_results_csv(tmp_path: Path, capsys) -> None:
    make_results().to_csv(tmp_path / RESULTS_CSV, index=False)
    before = (tmp_path / RESULTS_CSV).read_bytes()
    # tolerance 5 points: the gap of r=16 (4.5 points; s² = 1e-4 and 2.5e-5, se = 0.00645,
    # ν = 2.94, bound 0.045 + 2.37·0.00645 = 0.0603) still fails; the rule names 5 point(s)
    assert main(["report", str(tmp_path), "report.tolerance=0.05"]) == 0
    assert (tmp_path / RESULTS_CSV).read_bytes() == before  # not rebuilt from (absent) runs
    text = (tmp_path / "report.md").read_text()
    assert "below the tolerance of 5 point(s)" in text
    assert "not below 5 point(s)" in text
    assert "19 runs from" in capsys.readouterr().out


def test_a_missing_column_is_one_line_naming_it_and_exit_2(tmp_path: Path, capsys) -> None:
    table = tmp_path / RESULTS_CSV
    make_results().drop(columns=["trainable_params"]).to_csv(table, index=False)
    assert main(["report", str(table)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lora-lab: error: ")
    assert "missing required column(s): trainable_params" in err
    assert not (tmp_path / "report.md").exists()


def test_optional_columns_may_be_left_out(tmp_path: Path) -> None:
    # a filtered table with only the required columns (and val_acc): it still reports
    table = tmp_path / "small.csv"
    keep = ["run_id", "stage", "rank", "alpha", "seed", "learning_rate", "trainable_params"]
    make_results()[[*keep, "test_acc", "test_loss", "status"]].to_csv(table, index=False)
    assert main(["report", str(table)]) == 0
    assert "## Recommended rank" in (tmp_path / "report.md").read_text()


def test_bad_report_arguments_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["report", str(tmp_path)]) == 2  # an empty folder
    assert "no run results (result.json) or results.csv found" in capsys.readouterr().err
    assert main(["report", str(tmp_path), "report.tolerance=2"]) == 2
    assert "must be a number in [0, 1)" in capsys.readouterr().err
