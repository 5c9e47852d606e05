"""A user's own configs: `--config-dir` (and `hydra.searchpath`) folders reach both the
preflight's composition and Hydra's own."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from lora_lab.cli import main

# A user's experiment, as conf/experiment/*.yaml are: only the values that differ.
MINE = """\
# @package _global_
name: mine
sweep:
  ranks: [3, 5]
trainer:
  max_epochs: 2
"""


def _user_folder(root: Path, group: str, name: str, text: str) -> Path:
    (root / group).mkdir(parents=True)
    (root / group / f"{name}.yaml").write_text(text)
    return root


def _printed_job(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["sweep", *args, "--cfg", "job"]) == 0, capsys.readouterr().err
    return OmegaConf.to_container(OmegaConf.create(capsys.readouterr().out))


def test_an_experiment_of_the_users_own_folder_is_used(tmp_path: Path, capsys, monkeypatch):
    _user_folder(tmp_path / "my_conf", "experiment", "mine", MINE)
    monkeypatch.chdir(tmp_path)  # the README's relative `--config-dir my_conf`
    job = _printed_job(capsys, "--config-dir", "my_conf", "experiment=mine")
    assert job["name"] == "mine"
    assert job["sweep"]["ranks"] == [3, 5] and job["trainer"]["max_epochs"] == 2
    assert job["model"]["_target_"].endswith("MLP")  # the rest comes from lora_lab's configs


def test_config_dir_and_hydra_searchpath_add_up(tmp_path: Path, capsys):
    mine = _user_folder(tmp_path / "mine", "experiment", "mine", MINE)
    theirs = _user_folder(tmp_path / "theirs", "logger", "quiet", "_target_: builtins.dict\n")
    job = _printed_job(
        capsys,
        f"--config-dir={mine}",
        "experiment=mine",
        "logger=quiet",
        f"hydra.searchpath=[file://{theirs}]",
    )
    assert job["name"] == "mine" and job["logger"] == {"_target_": "builtins.dict"}


def test_a_missing_config_dir_is_one_line(tmp_path: Path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    missing = tmp_path / "nosuch"
    assert main(["sweep", "--config-dir", str(missing), "experiment=mine"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"lora-lab: error: --config-dir {str(missing)!r} is not a folder"
    assert not (tmp_path / "outputs").exists()
