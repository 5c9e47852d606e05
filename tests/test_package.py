"""A regular install works: the wheel holds every module and every config, and its `lora-lab`
runs a study from a folder outside the checkout."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.data import DATA_ENV
from tests.pipeline.study_config import tiny_study_overrides

ROOT = Path(__file__).resolve().parents[1]
# What a wheel is built from (pyproject.toml names README.md as the long description).
BUILD_INPUTS = ("pyproject.toml", "README.md", "lora_lab", "conf")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel of a copy of the checkout (a build in the checkout would leave build/ there)."""
    assert importlib.util.find_spec("setuptools"), "the build backend of pyproject.toml"
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        if (ROOT / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__")
            shutil.copytree(ROOT / name, source / name, ignore=ignore)
        else:
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path_factory.mktemp("dist")
    pip_wheel = ["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [sys.executable, *pip_wheel, "--wheel-dir", str(dist), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (built,) = dist.glob("lora_lab-*.whl")
    return built


@pytest.fixture(scope="module")
def side_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel installed, that reuses this venv's packages (torch, Lightning, …)
    through a .pth file, as `make setup`'s side venvs do. Its own site-packages come first,
    so its lora_lab is the wheel's, not this venv's editable one."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    main_site = sysconfig.get_path("purelib")
    Path(site, "lora_lab_main.pth").write_text(f"import site; site.addsitedir({main_site!r})\n")
    # --ignore-installed: never touch the lora_lab this venv sees through the .pth file.
    install = ["install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)]
    done = subprocess.run([python, "-m", "pip", *install], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return venv


def _outside(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A working folder outside the checkout, and an environment that adds nothing to the path."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    assert not folder.resolve().is_relative_to(ROOT)
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", DATA_ENV)}
    return folder, env


def test_the_wheel_holds_every_module_and_config(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "lora_lab").rglob("*.py")}
    assert modules <= names, sorted(modules - names)
    configs = {
        f"lora_lab/conf/{path.relative_to(ROOT / 'conf').as_posix()}"
        for path in (ROOT / "conf").rglob("*.yaml")
    }
    assert len(configs) > 30 and "lora_lab/conf/hydra/launcher/slurm.yaml" in configs
    assert configs <= names, sorted(configs - names)
    assert not any(name.startswith("conf/") for name in names)  # no top-level `conf` package


def test_the_installed_lora_lab_runs_a_study_from_any_folder(side_venv: Path, tmp_path: Path):
    folder, env = _outside(tmp_path)
    python, lora_lab = side_venv / "bin" / "python", side_venv / "bin" / "lora-lab"
    where = subprocess.run(
        [python, "-c", "import lora_lab; print(lora_lab.__file__)"],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(where).is_relative_to(side_venv), where

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [lora_lab, "sweep", *args],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )

    # The README's user folder: one experiment of their own beside the package's configs.
    (folder / "my_conf" / "experiment").mkdir(parents=True)
    (folder / "my_conf" / "experiment" / "mine.yaml").write_text(
        "# @package _global_\nname: mine\nsweep:\n  ranks: [3, 5]\n"
    )
    shown = run("--config-dir", "my_conf", "experiment=mine", "--cfg", "job")
    assert shown.returncode == 0, shown.stderr[-3000:]
    assert "name: mine" in shown.stdout and "_target_: lora_lab.models.MLP" in shown.stdout
    study = folder / "study"
    done = run(f"output_dir={study}", "sweep.ranks=[1]", *tiny_study_overrides(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(study / "results.csv")
    assert list(table.stage) == ["pretrain", "full_finetune", "lora"]
    assert (table.status == "ok").all() and (table.epochs == 1).all()
    assert (study / "report.md").is_file()
