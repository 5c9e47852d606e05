"""What a user sees and shares: Hydra's flags, shadowed overrides named, a readable log, and
files colleagues can read."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from lora_lab.cli import main
from lora_lab.pipeline import plan as plan_module
from lora_lab.pipeline import preflight as preflight_module
from lora_lab.pipeline import sweep as sweep_module
from lora_lab.pipeline.overrides import pinned_output_dir, shadowed_overrides
from tests.pipeline.study_config import composed, tiny_study_overrides


@pytest.mark.parametrize("flags", [["--cfg", "job"], ["--cfg=job"], ["-c", "job"]])
def test_cfg_job_prints_the_config_and_writes_nothing(flags, tmp_path: Path, capsys):
    out = tmp_path / "study"
    assert main(["sweep", *flags, f"output_dir={out}", "sweep.ranks=[1,4]"]) == 0
    printed = capsys.readouterr().out
    assert "sweep:" in printed and "- 4" in printed and "output_dir:" in printed
    assert not out.exists()


def test_help_states_the_precedence_rule(capsys):
    assert main(["sweep", "--help"]) == 0
    text = capsys.readouterr().out
    assert "Precedence: a stage's own setting" in text and "trainer.max_epochs=1" in text
    assert main(["--help"]) == 0
    assert "Precedence: a" in capsys.readouterr().out


def test_a_shadowed_command_line_value_is_named_with_its_shadow():
    overrides = ["experiment=linear_shift", "trainer.max_epochs=2"]
    (note,) = shadowed_overrides(composed(*overrides), overrides, "sweep")
    assert note.startswith("trainer.max_epochs=2 is shadowed by stages.lora.max_epochs=30")
    # given on the command line too: nothing to say
    both = [*overrides, "stages.lora.max_epochs=2"]
    assert shadowed_overrides(composed(*both), both, "sweep") == []
    # the default study has no stage values: trainer.max_epochs reaches every stage
    assert (
        shadowed_overrides(composed("trainer.max_epochs=1"), ["trainer.max_epochs=1"], "sweep")
        == []
    )


def test_sweep_axes_shadow_their_keys():
    overrides = ["lora.rank=4", "sweep.learning_rates=[0.1,0.01]", "module.optimizer.lr=0.5"]
    notes = shadowed_overrides(composed(*overrides), overrides, "sweep")
    assert any(n.startswith("lora.rank=4 does not reach the LoRA runs") for n in notes)
    assert any("module.optimizer.lr=0.5 does not reach the LoRA runs" in n for n in notes)
    # `lora-lab train` has no sweep: lora.rank is the run's rank
    assert shadowed_overrides(composed("lora.rank=4"), ["lora.rank=4"], "train") == []


def test_the_folder_the_preflight_checked_is_the_one_hydra_is_given():
    cfg = composed()  # output_dir: outputs/${name}_${now:…}, which Hydra would resolve again
    (pin,) = pinned_output_dir(cfg, [])
    (override,) = OverridesParser.create().parse_overrides([pin])
    assert override.key_or_group == "output_dir" and override.value() == str(cfg.output_dir)
    assert pinned_output_dir(cfg, ["output_dir=/tmp/mine"]) == []  # the user's own
    (pin,) = pinned_output_dir(OmegaConf.merge(cfg, {"output_dir": "/tmp/it's here"}), [])
    assert OverridesParser.create().parse_overrides([pin])[0].value() == "/tmp/it's here"


def test_a_study_is_planned_and_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    plan, preflight = plan_module.plan, preflight_module.preflight

    def counted_plan(cfg):
        calls.append("plan")
        return plan(cfg)

    def counted_preflight(*args):
        calls.append("preflight")
        return preflight(*args)

    monkeypatch.setattr(preflight_module, "plan", counted_plan)
    for module in (preflight_module, sweep_module):
        monkeypatch.setattr(module, "preflight", counted_preflight)
    args = ["sweep", *tiny_study_overrides(tmp_path), f"output_dir={tmp_path / 'study'}"]
    assert main([*args, "sweep.ranks=[1,2]"]) == 0
    assert calls == ["preflight", "plan"]  # by the command line; the study reuses its plan


@pytest.fixture(scope="module")
def logged_study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A tiny sweep run as a user runs it, stderr to a file (not a terminal), umask 022."""
    folder = tmp_path_factory.mktemp("logged")
    out = folder / "study"
    overrides = [o for o in tiny_study_overrides(folder) if "enable_progress_bar" not in o]
    code = (
        "import os, sys; os.umask(0o022); from lora_lab.cli import main; "
        "sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "sweep", f"output_dir={out}", "sweep.ranks=[1,2]", *overrides],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done.stderr


def test_progress_and_summary_reach_the_log_file(logged_study):
    out, _ = logged_study
    log = (out / "lora-lab.log").read_text()
    for line in (
        "[1/4] pretrain",
        "[2/4] full_finetune",
        "pretrain: epoch 1/1",
        "study written to",
    ):
        assert line in log


def test_the_counter_counts_every_run_fused_passes_included(logged_study):
    out, stderr = logged_study
    counters = re.findall(r"^\[([\d-]+)/(\d+)\] (.*) … eta (\S+)$", stderr, re.MULTILINE)
    assert [(count, total) for count, total, _, _ in counters] == [
        ("1", "4"),
        ("2", "4"),
        ("3-4", "4"),  # the two LoRA runs, in one fused pass
    ]
    assert counters[2][2] == "fused: lora ranks 1,2 seed 0: 2 runs train in one pass"
    assert counters[0][3] == "?" and all(eta != "?" for *_, eta in counters[1:])
    assert "[3-4/4] fused" in (out / "lora-lab.log").read_text()


def test_a_finished_fused_study_leaves_no_resume_files(logged_study):
    out, _ = logged_study
    assert pd.read_csv(out / "results.csv")["pass"].str.startswith("fused_").sum() == 2
    assert not (out / "passes").exists()
    assert [p for p in out.rglob("*") if p.name in ("identity.txt", "last.ckpt")] == []


def test_the_log_says_when_the_first_training_step_began(logged_study):
    out, _ = logged_study
    (line,) = [
        line for line in (out / "lora-lab.log").read_text().splitlines() if "start-up" in line
    ]
    seconds = float(re.search(r"first training step ([\d.]+) s after the process started", line)[1])
    assert 0 < seconds < 300  # the fixture's own time limit


def test_train_prints_its_figures_as_results_csv_has_them(tmp_path: Path, capsys):
    out = tmp_path / "base"
    args = ["train", "stage=pretrain", *tiny_study_overrides(tmp_path), f"output_dir={out}"]
    assert main(args) == 0
    (line,) = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("pretrain:")
    ]
    row = pd.read_csv(out / "results.csv").iloc[0]
    assert line == (
        f"pretrain: test_acc={row.test_acc} test_loss={row.test_loss} on the finetune task's "
        f"test set; source_test_acc={row.source_test_acc} on its own task's → {out}"
    )


def test_no_per_batch_bar_when_stderr_is_not_a_terminal(logged_study):
    _, stderr = logged_study
    assert "it/s]" not in stderr and "\r" not in stderr
    assert "pretrain: epoch 1/1 " in stderr  # one line per epoch instead
    assert stderr.count("loaded from") == 1  # said once, not once per run


def test_files_follow_the_umask(logged_study):
    out, _ = logged_study
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) > 10
    modes = {str(p.relative_to(out)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {name: mode for name, mode in modes.items() if mode != 0o644} == {}


def test_the_readme_example_trains_every_stage_for_the_epochs_given(logged_study):
    out, _ = logged_study
    table = pd.read_csv(out / "results.csv")
    assert len(table) == 4 and (table.epochs == 1).all()
    assert os.path.isfile(out / "report.md")


def test_a_tuned_study_ends_with_its_recommended_rank(tmp_path: Path, capsys):
    out = tmp_path / "study"
    args = ["sweep", *tiny_study_overrides(tmp_path), f"output_dir={out}", "sweep.ranks=[1,2]"]
    args += ["sweep.seeds=[0,1,2]", "sweep.learning_rates=[1e-3,1e-2]"]
    args += ["stages.full_finetune.learning_rates=[1e-3,1e-2]"]
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines[-1].startswith("recommended rank: ")
    table = pd.read_csv(out / "results.csv")
    assert table.val_acc.notna().all() and table.selected.dtype == bool
    # one learning rate per (stage, rank): 3 baseline rows and 3 seeds × 2 ranks of LoRA
    tuned = table[table.selected & (table.stage != "pretrain")]
    assert (
        len(tuned) == 3 + 6
        and tuned.groupby(["stage", "rank"], dropna=False).learning_rate.nunique().max() == 1
    )
    report = (out / "report.md").read_text()
    assert report.index("## Recommended rank") < report.index("## Headline")
    assert "## Learning rates" in report and (out / "lr_heatmap.png").is_file()
