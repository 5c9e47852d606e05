"""The result type: a run's result, written as result.json and read back as a table row."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.results import (
    COLUMNS,
    RESULT_FILE,
    RunResult,
    find_results,
    normalize_results,
    parse_confusion,
    parse_train_classes,
    read_results,
    results_frame,
    write_result,
)
from tests.report.fakes import make_results


def finished(**changes) -> RunResult:
    values = dict(
        run_id="lora_r4_a4_s1", stage="lora", rank=4, alpha=4.0, seed=1, learning_rate=1e-3,
        method="default", trainable_params=100, total_params=1000, test_acc=0.875,
        test_loss=0.4, val_acc=0.86, per_class_acc={"Sandal": 0.9}, train_seconds=1.5,
        epochs=2, run_dir="runs/lora_r4_a4_s1", pass_id="fused_ab12", identity="0123456789abcdef",
        artefact="adapters/rank_4_seed_1", extra={"delta_rel_error": 0.25},
    )  # fmt: skip
    return RunResult(**{**values, **changes})


def test_a_result_round_trips_through_result_json(tmp_path: Path):
    result = finished()
    write_result(tmp_path / result.run_dir, result.to_record(config={"seed": 1}, environment={}))
    (record,) = find_results(tmp_path)[0]
    assert RunResult.from_record(record) == result
    assert record["config"] == {"seed": 1} and record["pass"] == "fused_ab12"


def test_the_table_has_the_contract_columns_in_order_then_the_extras(tmp_path: Path):
    failed = RunResult(run_id="pretrain", stage="pretrain", seed=0, status="failed", error="E: x")
    frame = results_frame([finished().to_record(), failed.to_record()])
    assert list(frame.columns) == [*COLUMNS, "delta_rel_error"]
    assert list(frame["stage"]) == ["pretrain", "lora"]  # stage order, not input order
    assert frame.loc[1, "rank"] == 4 and pd.isna(frame.loc[0, "rank"])  # Int64 beside empties
    assert json.loads(frame.loc[1, "per_class_acc"]) == {"Sandal": 0.9}
    assert "identity" not in frame and "artefact" not in frame  # records, not columns
    frame.to_csv(tmp_path / "results.csv", index=False)
    table = read_results(tmp_path / "results.csv")
    assert table.loc[1, "pass"] == "fused_ab12" and table.loc[0, "error"] == "E: x"
    assert table.loc[1, "alpha_per_rank"] == 1.0


def test_a_table_without_a_required_column_is_refused_in_one_line():
    frame = results_frame([finished().to_record()]).drop(columns=["test_loss"])
    with pytest.raises(
        ValueError, match=r"^results table: missing required column\(s\): test_loss$"
    ):
        normalize_results(frame)


def test_corrupt_result_files_are_reported_not_dropped(tmp_path: Path):
    (tmp_path / "runs" / "bad").mkdir(parents=True)
    (tmp_path / "runs" / "bad" / RESULT_FILE).write_text("{not json")
    results, problems = find_results(tmp_path)
    assert results == [] and len(problems) == 1 and "runs/bad/result.json" in problems[0]


def test_read_results_keeps_text_as_text_and_blanks_empty_errors(tmp_path: Path) -> None:
    df = make_results(ranks=(1,), seeds=(0,))
    df.loc[0, "run_id"] = "007"
    df.to_csv(tmp_path / "results.csv", index=False)
    read = read_results(tmp_path / "results.csv")
    assert read.loc[0, "run_id"] == "007"  # not the integer 7
    assert (read["error"] == "").all()
    assert read["rank"].dtype == float and read["rank"].isna().sum() == 2


def test_empty_results_file_is_a_value_error(tmp_path: Path) -> None:
    (tmp_path / "results.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        read_results(tmp_path / "results.csv")


def test_a_results_summary_rounds_as_the_table_and_names_the_task(tmp_path: Path):
    lora = finished(test_acc=0.23240000009536743, test_loss=2.302585124969482, val_acc=None)
    pretrain = finished(
        run_id="pretrain", stage="pretrain", rank=None, test_acc=0.0, source_test_acc=0.8999999761
    )
    write_result(tmp_path / "runs" / "a", lora.to_record())
    row = results_frame(find_results(tmp_path)[0]).iloc[0]
    assert lora.summary() == f"lora_r4_a4_s1: test_acc={row.test_acc} test_loss={row.test_loss}"
    assert lora.summary() == "lora_r4_a4_s1: test_acc=0.2324 test_loss=2.30259"
    assert pretrain.summary() == (
        "pretrain: test_acc=0.0 test_loss=0.4 on the finetune task's test set; "
        "source_test_acc=0.9 on its own task's"
    )


def test_confusion_trained_classes_and_full_rank_round_trip_through_the_table(tmp_path: Path):
    counts = {"Sandal": [7, 3], "Shirt": [1, 9]}
    result = finished(
        confusion={"predicted": ["Sandal", "Shirt"], "counts": counts},
        train_classes=["Sandal", "Shirt"],
        full_rank_at=64,
    )
    results_frame([result.to_record()]).to_csv(tmp_path / "results.csv", index=False)
    row = read_results(tmp_path / "results.csv").iloc[0]
    assert row["full_rank_at"] == 64
    assert parse_train_classes(row["train_classes"]) == ["Sandal", "Shirt"]
    matrix = parse_confusion(row["confusion"])
    assert matrix is not None and matrix.loc["Shirt"].tolist() == [1, 9]
    assert list(matrix.columns) == ["Sandal", "Shirt"]
    assert parse_confusion("[1, 2]") is None and parse_confusion("") is None
