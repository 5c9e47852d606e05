"""Fixtures: synthetic study folders (built by testkit) for analyze_study."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from lora_lab.analysis import analyze_study
from tests.analysis.testkit import build_main_study


@pytest.fixture(scope="module")
def main_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The main study, analysed once for the whole module (keeps the suite fast)."""
    root = build_main_study(tmp_path_factory.mktemp("study"))
    analyze_study(root)
    return root


@pytest.fixture
def study_builder(tmp_path: Path) -> Callable[..., Path]:
    return lambda **kwargs: build_main_study(tmp_path, **kwargs)
