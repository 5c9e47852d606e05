"""Fixtures for pipeline tests: tiny Fashion-MNIST-format files and overrides for a quick study
(built by ``tests.pipeline.study_config``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab.data import DATA_ENV
from tests.pipeline.study_config import tiny_study_overrides


@pytest.fixture(autouse=True)
def _no_data_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)


@pytest.fixture
def tiny_overrides(tmp_path: Path) -> list[str]:
    """Overrides for a seconds-long study on tiny files in this test's tmp_path."""
    return tiny_study_overrides(tmp_path)
