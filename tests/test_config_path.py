"""One definition of where the configs live: a checkout's own conf/, else the package's."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab import cli, config_path
from lora_lab.pipeline import methods

ROOT = Path(__file__).resolve().parents[1]


def test_a_checkout_reads_its_own_conf():
    assert config_path.config_dir() == ROOT / "conf"
    assert config_path.config_search_path() == str(ROOT / "conf")
    assert cli.CONF_DIR == methods.CONF_DIR == ROOT / "conf"
    assert (cli.CONF_DIR / "lora" / "dora.yaml").is_file()


def test_an_install_searches_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config_path, "_ROOT", tmp_path)  # site-packages: no pyproject.toml
    assert config_path.config_search_path() == "pkg://lora_lab.conf"


def test_an_install_without_its_configs_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(config_path, "_ROOT", tmp_path)
    monkeypatch.setattr(config_path, "CONFIG_PACKAGE", "lora_lab.no_such_conf")
    with pytest.raises(config_path.ConfigsNotFound, match=r"lora_lab.no_such_conf\) are not"):
        config_path.config_dir()
