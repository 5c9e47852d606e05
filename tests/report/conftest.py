"""Fixtures for the report tests; the builders live in ``tests.report.fakes``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest

from tests.report.fakes import make_results, write_study


@pytest.fixture
def results() -> pd.DataFrame:
    return make_results()


@pytest.fixture
def study_factory(tmp_path: Path) -> Callable[..., Path]:
    """``study_factory(df, name="study", metrics=True)`` -> a study folder under tmp_path."""

    def build(df: pd.DataFrame, name: str = "study", **kwargs: object) -> Path:
        return write_study(tmp_path / name, df, **kwargs)

    return build
