"""The committed gallery: every study names the command that regenerates it, and one study
really is regenerated (slow)."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
GALLERY = ROOT / "experiments"


def _load_maker():
    spec = importlib.util.spec_from_file_location("make_gallery", GALLERY / "make_gallery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STUDIES = _load_maker().STUDIES
NO_ANALYSIS = _load_maker().NO_ANALYSIS


def test_gallery_has_every_study():
    assert sorted(p.name for p in GALLERY.iterdir() if (p / "REPORT.md").is_file()) == sorted(
        STUDIES
    )


@pytest.mark.parametrize("name", sorted(STUDIES))
def test_gallery_report_names_its_command(name: str):
    folder = GALLERY / name
    text = (folder / "REPORT.md").read_text()
    head = text[:1500]
    assert f"experiments/make_gallery.py {name}" in head
    sweep_line = re.search(r"^lora-lab sweep .*$", head, re.MULTILINE)
    assert sweep_line and all(arg in sweep_line.group(0) for arg in STUDIES[name])
    analyzed = re.search(rf"^lora-lab analyze \S+{name}$", head, re.MULTILINE)
    assert bool(analyzed) == (name not in NO_ANALYSIS)
    table = pd.read_csv(folder / "results.csv")
    assert {"stage", "rank", "seed", "test_acc", "test_loss", "status"} <= set(table.columns)
    assert table.status.isin(["ok", "diverged"]).all()
    assert (folder / "analysis.csv").is_file() == (name not in NO_ANALYSIS)
    assert (folder / "accuracy_vs_rank.png").is_file()
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 2 * 1024 * 1024, f"{name} holds {size} bytes; the gallery keeps no checkpoints"
    for image in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert (folder / image).is_file(), f"REPORT.md links a missing {image}"


@pytest.mark.slow
def test_one_gallery_study_regenerates(tmp_path: Path):
    reduced = [
        "data.n=2000",
        "data.d_in=101",
        "data.d_out=100",
        "data.batch_size=256",
        "module.optimizer.lr=20",
        "stages.lora.max_epochs=30",
        "stages.pretrain.max_epochs=10",
        "stages.full_finetune.max_epochs=10",
    ]
    done = subprocess.run(
        [
            sys.executable,
            str(GALLERY / "make_gallery.py"),
            "linear_shift",
            "--into",
            str(tmp_path / "g"),
            "--work",
            str(tmp_path / "w"),
            "--extra",
            *reduced,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    folder = tmp_path / "g" / "linear_shift"
    assert (
        "experiments/make_gallery.py linear_shift --extra data.n=2000"
        in (folder / "REPORT.md").read_text()
    )
    table = pd.read_csv(folder / "results.csv").set_index("stage")
    assert table.loc["lora", "delta_rel_error"] < 0.05
    analysis = pd.read_csv(folder / "analysis.csv")
    spectrum = analysis[analysis.kind == "spectrum"].iloc[0]
    assert spectrum.sigma1_over_sigma2 > 100 and spectrum.effective_rank < 1.1
    assert analysis[analysis.kind == "lora_vs_full"].proj_top1.iloc[0] > 0.99


def _load_controls():
    spec = importlib.util.spec_from_file_location("controls", GALLERY / "controls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_study_controls_table_is_computed_from_committed_results():
    """controls.md is what the verdict code computes from the committed results.csv files, and
    each control names the one thing it changes in its command."""
    controls = _load_controls()
    folder = controls.FOLDER
    assert (folder / "controls.md").read_text() == controls.table()
    for name, (_, overrides) in controls.CONTROLS.items():
        head = (folder / name / "REPORT.md").read_text()[:1500]
        made_by = re.search(r"^Made by `(lora-lab sweep [^`]*)`", head, re.MULTILINE)
        assert made_by, f"{name}: REPORT.md does not name its command"
        assert all(arg in made_by.group(1) for arg in [*controls.BASE, *overrides])
