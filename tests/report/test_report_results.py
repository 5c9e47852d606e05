"""The report refuses a missing or incomplete results.csv in one line, writing nothing."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from lora_lab.report import summary_table, write_report
from lora_lab.results import COLUMNS
from tests.report.fakes import make_results


def test_missing_results_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"results\.csv: results file not found"):
        write_report(tmp_path)


def test_missing_required_columns_are_named_in_one_line(tmp_path: Path) -> None:
    make_results(ranks=(1,), seeds=(0,)).drop(columns=["rank", "status"]).to_csv(
        tmp_path / "results.csv", index=False
    )
    with pytest.raises(ValueError) as info:
        write_report(tmp_path)
    message = str(info.value)
    assert str(tmp_path / "results.csv") in message
    assert "rank" in message and "status" in message
    assert "seed" not in message  # only the missing ones
    assert "\n" not in message
    assert not (tmp_path / "report.md").exists()


def test_summary_table_validates_in_memory_tables_too() -> None:
    with pytest.raises(ValueError, match="test_loss"):
        summary_table(pd.DataFrame(columns=[c for c in COLUMNS if c != "test_loss"]))
