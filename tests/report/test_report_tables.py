"""summary_table numbers, checked against values computed by hand, and the Markdown table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lora_lab.report import summary_table
from lora_lab.report.tables import format_summary, markdown_table
from tests.report.fakes import run_row


@pytest.fixture
def known() -> pd.DataFrame:
    rows = [
        run_row("pretrain", 0, 0.40),
        run_row("full_finetune", 0, 0.90),
        run_row("full_finetune", 1, 0.92),
        run_row("lora", 0, 0.80, rank=4),
        run_row("lora", 1, 0.84, rank=4),
        run_row("lora", 2, 0.83, rank=4),
        run_row("lora", 0, 0.86, rank=8),
        # Failed: a garbage accuracy must not leak into any mean.
        run_row("lora", 1, 0.0, rank=8, status="failed", error="boom"),
    ]
    return pd.DataFrame(rows)


def _row(summary: pd.DataFrame, stage: str, rank: float | None = None) -> pd.Series:
    rows = summary[summary["stage"] == stage]
    if rank is not None:
        rows = rows[rows["rank"] == rank]
    assert len(rows) == 1
    return rows.iloc[0]


def test_summary_means_and_sample_stds_match_hand_computation(known: pd.DataFrame) -> None:
    summary = summary_table(known)
    assert list(summary["stage"]) == ["pretrain", "full_finetune", "lora", "lora"]

    full = _row(summary, "full_finetune")
    assert full["test_acc_mean"] == pytest.approx(0.91)
    assert full["test_acc_std"] == pytest.approx(math.sqrt(2 * 0.01**2 / 1))  # ddof = 1
    assert full["n_seeds"] == 2 and full["failed"] == 0

    rank4 = _row(summary, "lora", 4)
    mean = (0.80 + 0.84 + 0.83) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in (0.80, 0.84, 0.83)) / 2)
    assert rank4["test_acc_mean"] == pytest.approx(mean)
    assert rank4["test_acc_std"] == pytest.approx(std)
    # test_loss = 2.5 * (1 - acc) in the fake rows, so its spread is 2.5 times larger.
    assert rank4["test_loss_std"] == pytest.approx(2.5 * std)
    assert rank4["trainable_params"] == 600
    assert rank4["total_params"] == 100_600
    # the share of the full finetune's trainable parameters (the network's 100,000)
    assert rank4["pct_trainable"] == pytest.approx(100 * 600 / 100_000)
    assert rank4["train_seconds_mean"] == pytest.approx((10 + 11 + 12) / 3)


def test_failed_runs_are_counted_not_averaged(known: pd.DataFrame) -> None:
    rank8 = _row(summary_table(known), "lora", 8)
    assert rank8["n_seeds"] == 1 and rank8["failed"] == 1
    assert rank8["test_acc_mean"] == pytest.approx(0.86)
    assert math.isnan(rank8["test_acc_std"])  # one seed: no spread to report


def test_single_seed_table_has_nan_std_and_multi_seed_table_fills_it(known: pd.DataFrame) -> None:
    single = summary_table(known[known["seed"] == 0])
    assert single["test_acc_std"].isna().all()
    multi = summary_table(known)
    assert multi["test_acc_std"].notna().sum() == 2  # full finetune and rank 4
    shown = format_summary(multi)
    assert "0.9100 ± 0.0141" in set(shown["test_acc"])
    assert shown.loc[shown["stage"] == "pretrain", "test_acc"].item() == "0.4000"


def test_extra_numeric_columns_are_summarised(known: pd.DataFrame) -> None:
    known["delta_rel_error"] = [None, 0.2, 0.4, 0.1, 0.3, 0.2, 0.05, None]
    known["note"] = "text columns are not summarised"
    summary = summary_table(known)
    assert _row(summary, "full_finetune")["delta_rel_error_mean"] == pytest.approx(0.3)
    assert "note_mean" not in summary.columns
    assert "delta_rel_error" in format_summary(summary).columns


def test_markdown_table_escapes_pipes_and_right_aligns_numbers() -> None:
    frame = pd.DataFrame({"name": ["a|b", "multi\nline"], "value": ["1,200", "0.5 ± 0.1"]})
    lines = markdown_table(frame).splitlines()
    assert lines[0] == "| name | value |"
    assert lines[1] == "|:---|---:|"
    assert lines[2] == "| a\\|b | 1,200 |"
    assert lines[3] == "| multi line | 0.5 ± 0.1 |"


def test_markdown_table_says_how_many_rows_it_left_out() -> None:
    text = markdown_table(pd.DataFrame({"x": range(40)}), max_rows=30)
    assert sum(line.startswith("| ") for line in text.splitlines()) == 1 + 30  # header + rows
    assert "10 more rows not shown" in text
