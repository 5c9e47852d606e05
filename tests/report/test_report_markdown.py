"""write_report end to end on fake study folders."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.report import write_report
from lora_lab.report.markdown import _headline
from tests.report.fakes import assert_png, make_regression_results, make_results
from tests.report.test_report_selection import full, lora, table

PLOTS = ("accuracy_vs_rank.png", "accuracy_vs_params.png", "curves.png", "per_class.png")


def _section(report: str, title: str) -> str:
    """The text of one ``## title`` section (up to the next ``## ``)."""
    start = report.index(f"## {title}\n")
    end = report.find("\n## ", start + 1)
    return report[start : end if end != -1 else None]


def test_report_renders_from_results_table_alone(tmp_path: Path) -> None:
    # No metrics.csv, no study.json, no .hydra, no per-class numbers: just results.csv.
    make_results(per_class=False).to_csv(tmp_path / "results.csv", index=False)
    report_path = write_report(tmp_path)
    assert report_path == tmp_path / "report.md"
    report = report_path.read_text()
    assert report.startswith(f"# Study report: {tmp_path.name}\n")
    for absent in (
        "## Command",
        "## Environment",
        "## Failed runs",
        "## Analysis",
        "<details><summary><code>",
    ):
        assert absent not in report
    assert "![Accuracy vs LoRA rank](accuracy_vs_rank.png)" in report
    assert_png(tmp_path / "accuracy_vs_rank.png")
    assert_png(tmp_path / "accuracy_vs_params.png")
    assert not (tmp_path / "curves.png").exists() and not (tmp_path / "per_class.png").exists()
    nothing = "`lr_heatmap.png`, `curves.png`, `per_class.png`, `confusion.png`"
    assert f"Not drawn, nothing to show: {nothing}." in report
    results = _section(report, "Results")
    assert "| lora | 8 | 8 | 0.001 | 3 |" in results  # rank 8, alpha 8, lr, three seeds
    assert "0.8250 ± 0.0050" in results  # mean ± sd of 0.820, 0.825, 0.830
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_lists_failed_runs_and_still_draws_every_plot(study_factory) -> None:
    df = make_results(ranks=(1, 4, 16))
    failed = df["run_id"].isin(["lora_r4_s1", "full_finetune_s2"])
    df.loc[failed, ["test_acc", "test_loss", "per_class_acc"]] = [None, None, "{}"]
    df.loc[failed, "status"] = "failed"
    df.loc[df["run_id"] == "lora_r4_s1", "error"] = (
        "Traceback (most recent call last):\n  File 'x.py', line 1\nRuntimeError: CUDA | out of memory"
    )
    df.loc[df["run_id"] == "full_finetune_s2", "error"] = "ValueError: bad learning rate"
    study = study_factory(df)
    report = write_report(study).read_text()
    failed_section = _section(report, "Failed runs")
    assert "| lora_r4_s1 | lora | failed | RuntimeError: CUDA \\| out of memory |" in failed_section
    assert (
        "| full_finetune_s2 | full_finetune | failed | ValueError: bad learning rate |"
        in failed_section
    )
    assert report.startswith(f"# Study report: {study.name}\n\n13 runs (2 failed)")
    for name in PLOTS:
        assert_png(study / name)
        assert f"]({name})" in report
    # The failed seed is counted in the summary, not averaged.
    assert "| lora | 4 | 8 | 0.001 | 2 | 1 |" in _section(report, "Results")


def test_report_counts_diverged_runs_per_configuration(study_factory) -> None:
    df = make_results(ranks=(1, 4), seeds=(0, 1, 2))
    diverged = df["run_id"] == "lora_r4_s2"
    df.loc[diverged, ["status", "error"]] = ["diverged", "loss is not finite at epoch 1"]
    report = write_report(study_factory(df)).read_text()
    assert report.startswith("# Study report: study\n\n10 runs (0 failed, 1 diverged)")
    assert "| lora_r4_s2 | lora | diverged | loss is not finite at epoch 1 |" in report
    # counted in its configuration's row (2 finished, 1 not, 1 of them diverged), not averaged
    assert "| lora | 4 | 8 | 0.001 | 2 | 1 | 1 |" in _section(report, "Results")


def test_report_includes_command_environment_config_and_analysis(study_factory) -> None:
    study = study_factory(make_results(ranks=(1, 4), seeds=(0,)), metrics=False)
    (study / "study.json").write_text(
        json.dumps(
            {
                "command": "lora-lab sweep sweep.ranks=[1,4]",
                "environment": {
                    "python": "3.11.9",
                    "packages": {"torch": "2.14.1"},
                    "git_commit": "deadbeef",
                    "device": "cpu",
                },
            }
        )
    )
    (study / ".hydra").mkdir()
    config = "sweep:\n  ranks: [1, 4]\n# a ``` fence inside must not end the block\n"
    (study / ".hydra" / "config.yaml").write_text(config)
    kinds = ["spectrum"] * 3 + ["subspace"] * 40
    pd.DataFrame(
        {
            "kind": kinds,
            "layer": "fc1",
            "sigma1": [1.23456789] * 3 + [None] * 40,
            "phi_mean": [None] * 3 + [0.5] * 40,
        }
    ).to_csv(study / "analysis.csv", index=False)
    (study / "analysis_spectrum.png").write_bytes(b"png")
    report = write_report(study).read_text()

    assert "```bash\nlora-lab sweep sweep.ranks=[1,4]\n```" in report
    environment = _section(report, "Environment")
    assert (
        "| packages: torch | 2.14.1 |" in environment and "| git_commit | deadbeef |" in environment
    )
    analysis = _section(report, "Analysis")
    assert "![spectrum](analysis_spectrum.png)" in analysis
    spectrum = analysis[analysis.index("#### spectrum") : analysis.index("#### subspace")]
    assert "| fc1 | 1.235 |" in spectrum and "phi_mean" not in spectrum  # its columns only
    assert "10 more rows not shown" in analysis[analysis.index("#### subspace") :]
    assert "````yaml\n" + config + "````" in report  # verbatim, in a longer fence
    assert (
        report.index("## Plots") < report.index("## Analysis") < report.index("## Resolved config")
    )


def test_regression_report_shows_loss_and_extra_columns(study_factory) -> None:
    study = study_factory(make_regression_results(), acc=False)
    report = write_report(study).read_text()
    results = _section(report, "Results")
    assert "test_acc" not in results.splitlines()[4]  # the header row: no empty accuracy column
    assert "test_loss" in results and "delta_rel_error" in results
    assert "Best LoRA (r=4 α=8 lr=0.001): test loss" in report
    assert_png(study / "accuracy_vs_rank.png")
    assert_png(study / "curves.png")


def test_rewriting_a_report_removes_a_plot_that_no_longer_applies(study_factory) -> None:
    df = make_results(ranks=(1, 2), seeds=(0,))
    study = study_factory(df, metrics=False)
    write_report(study)
    assert (study / "per_class.png").exists()
    df.assign(per_class_acc="{}").to_csv(study / "results.csv", index=False)
    report = write_report(study).read_text()
    assert not (study / "per_class.png").exists()
    assert "per_class.png)" not in report


def _edge_tables() -> dict[str, pd.DataFrame]:
    df = make_results(ranks=(1, 4), seeds=(0, 1))
    no_rank = df.copy()
    no_rank.loc[no_rank["stage"] == "lora", "rank"] = None
    bad_json = df.copy()
    bad_json.loc[[3, 4], "per_class_acc"] = ["not json", "[1, 2]"]
    return {
        "header_only": df.iloc[:0],
        "all_failed": df.assign(status="failed", test_acc=None, test_loss=None, error="x"),
        "lora_only": df[df["stage"] == "lora"],
        "pretrain_only": df[df["stage"] == "pretrain"],
        "lora_without_rank": no_rank,
        "malformed_per_class": bad_json,
    }


@pytest.mark.parametrize("name", list(_edge_tables()))
def test_odd_tables_render_without_any_plot_failing(tmp_path: Path, name: str) -> None:
    # write_report survives a plot that raises (and says so); no plot should need that here.
    _edge_tables()[name].to_csv(tmp_path / "results.csv", index=False)
    report = write_report(tmp_path).read_text()
    assert "_Not drawn:" not in report
    for png in tmp_path.glob("*.png"):
        assert_png(png)


def test_the_headlines_best_lora_is_chosen_on_validation_never_on_test():
    rows = [full(1e-3, s, 0.9, 0.95) for s in range(3)]
    rows += [lora(4, 1e-3, s, val=0.91, test=0.90, params=10) for s in range(3)]
    rows += [lora(8, 1e-3, s, val=0.85, test=0.94, params=20) for s in range(3)]  # best on test
    text = "\n".join(_headline(table(rows)))
    assert "Best LoRA on validation (r=4" in text and "r=8" not in text
