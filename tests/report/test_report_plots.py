"""The figures: what they draw (inspected on the unsaved Figure) and that the PNGs are real."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_lab.report import plots
from lora_lab.report.curves import collect_curves
from tests.report.fakes import assert_png, make_regression_results, vary_lora, write_study


def _legend_labels(fig) -> list[str]:
    """The figure legend's labels in reading order (rows top to bottom, left to right)."""
    assert len(fig.legends) == 1, "expected one figure-level legend"
    fig.draw_without_rendering()
    texts = fig.legends[0].get_texts()
    boxes = [text.get_window_extent() for text in texts]
    order = sorted(range(len(texts)), key=lambda i: (-round(boxes[i].y0), boxes[i].x0))
    return [texts[i].get_text() for i in order]


def _lora_lines(ax) -> dict[str, object]:
    return {
        line.get_label(): line for line in ax.get_lines() if line.get_label().startswith("LoRA")
    }


def _with_failure(df: pd.DataFrame) -> pd.DataFrame:
    """Mark one rank-16 run failed but leave a garbage accuracy in it: plots must drop it."""
    df = df.copy()
    failed = df["run_id"] == "lora_r16_s2"
    df.loc[failed, ["status", "error", "test_acc"]] = ["failed", "RuntimeError: out of memory", 0.0]
    return df


def test_rank_plot_draws_seed_means_baselines_and_param_counts(results: pd.DataFrame) -> None:
    fig = plots.draw_accuracy_vs_rank(_with_failure(results))
    ax = fig.axes[0]
    (line,) = _lora_lines(ax).values()
    ok = results[(results["stage"] == "lora") & (results["run_id"] != "lora_r16_s2")]
    expected = ok.groupby("rank")["test_acc"].mean()
    np.testing.assert_allclose(line.get_xdata(), expected.index)
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())  # failed 0.0 dropped
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4", "8", "16"]
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    dotted = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
    assert dashed[0].get_ydata()[0] == pytest.approx(0.91)  # full finetune mean over 3 seeds
    assert dotted[0].get_ydata()[0] == pytest.approx(0.41)  # pretrain on the finetune test set
    assert _legend_labels(fig) == [
        "LoRA (mean ± sd)", "full finetune (0.910)", "before finetuning (0.410)",
    ]  # fmt: skip
    assert [t.get_text() for t in ax.texts] == ["150", "300", "600", "1.2k", "2.4k"]
    assert ax.collections, "expected a ± sd band for three seeds"


def test_rank_plot_uses_alpha_as_hue_when_it_varies(results: pd.DataFrame) -> None:
    df = vary_lora(results, "alpha", (8.0, 16.0))
    assert plots.rank_plot_dimensions(df) == ("alpha", None)
    fig = plots.draw_accuracy_vs_rank(df)
    assert len(fig.axes) == 1
    assert set(_lora_lines(fig.axes[0])) == {"LoRA α=8", "LoRA α=16"}
    assert _legend_labels(fig)[:2] == ["LoRA α=8", "LoRA α=16"]  # numeric, not string, order
    # The parameter count is written once per rank, not once per hue line.
    assert len(fig.axes[0].texts) == 5


def test_alpha_tied_to_rank_is_one_setting_not_a_hue(results: pd.DataFrame) -> None:
    df = results.copy()
    lora = df["stage"] == "lora"
    df.loc[lora, "alpha"] = df.loc[lora, "rank"]  # α = r, as the default sweep does
    assert plots.rank_plot_dimensions(df) == (None, None)
    fig = plots.draw_accuracy_vs_rank(df)
    assert set(_lora_lines(fig.axes[0])) == {"LoRA (mean ± sd)"}
    assert fig.get_suptitle().endswith("\nα=r, lr=0.001")


def test_alpha_sweep_tied_to_rank_is_shown_as_the_ratio(results: pd.DataFrame) -> None:
    df = vary_lora(results, "alpha", (1.0, 2.0))
    lora = df["stage"] == "lora"
    df.loc[lora, "alpha"] *= df.loc[lora, "rank"]  # α ∈ {r, 2r}
    assert plots.rank_plot_dimensions(df) == ("alpha_per_rank", None)
    fig = plots.draw_accuracy_vs_rank(df)
    assert set(_lora_lines(fig.axes[0])) == {"LoRA α/r=1", "LoRA α/r=2"}


def test_rank_plot_facets_by_learning_rate_when_alpha_also_varies(results: pd.DataFrame) -> None:
    df = vary_lora(vary_lora(results, "alpha", (8.0, 16.0)), "learning_rate", (1e-3, 1e-2))
    assert plots.rank_plot_dimensions(df) == ("alpha", "learning_rate")
    fig = plots.draw_accuracy_vs_rank(df)
    assert [ax.get_title() for ax in fig.axes] == ["lr=0.001", "lr=0.01"]
    for ax in fig.axes:
        assert set(_lora_lines(ax)) == {"LoRA α=8", "LoRA α=16"}


def test_regression_study_plots_test_loss_on_a_log_axis() -> None:
    df = make_regression_results()
    fig = plots.draw_accuracy_vs_rank(df)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log"
    assert "loss" in ax.get_ylabel() and "regression" in ax.get_ylabel()
    (line,) = _lora_lines(ax).values()
    expected = df[df["stage"] == "lora"].groupby("rank")["test_loss"].mean()
    np.testing.assert_allclose(line.get_ydata(), expected.to_numpy())
    assert "loss" in fig.get_suptitle()
    params_fig = plots.draw_accuracy_vs_params(df)
    assert params_fig.axes[0].get_yscale() == "log"


def test_params_plot_colours_lora_by_rank_and_marks_full_finetune(results: pd.DataFrame) -> None:
    fig = plots.draw_accuracy_vs_params(_with_failure(results))
    labels = _legend_labels(fig)
    assert labels[:5] == [f"LoRA r={r}" for r in (1, 2, 4, 8, 16)]
    assert "full finetune (0.910)" in labels and "before finetuning (0.410)" in labels
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    colours = {
        tuple(c.get_facecolor()[0]) for c in ax.collections if c.get_label().startswith("LoRA")
    }
    assert len(colours) == 5
    rank16 = next(c for c in ax.collections if c.get_label() == "LoRA r=16")
    assert rank16.get_offsets()[0][1] == pytest.approx((0.86 + 0.865) / 2)  # failed seed dropped


def test_per_class_compares_before_full_and_best_lora(results: pd.DataFrame) -> None:
    results = results.assign(val_acc=results["test_acc"])  # the best is chosen on validation
    table = plots.per_class_table(results)
    assert list(dict.fromkeys(table["model"])) == [
        "before finetuning", "full finetune", "best LoRA r=16",
    ]  # fmt: skip
    fig = plots.draw_per_class(results)
    bars = [p for p in fig.axes[0].patches if p.get_height() > 0]
    assert len(bars) == 3 * 5  # three models x five classes


def test_plots_skip_when_there_is_nothing_to_draw(tmp_path: Path, results: pd.DataFrame) -> None:
    all_failed = results.assign(status="failed", test_acc=np.nan, test_loss=np.nan)
    assert plots.plot_accuracy_vs_rank(all_failed, tmp_path / "a.png") is None
    assert plots.plot_accuracy_vs_params(all_failed, tmp_path / "b.png") is None
    assert plots.plot_per_class(results.assign(per_class_acc="{}"), tmp_path / "c.png") is None
    assert plots.plot_curves(tmp_path, results, tmp_path / "d.png") is None  # no logs at all
    assert list(tmp_path.iterdir()) == []


def test_curves_read_sparse_logs_and_note_missing_files(
    study_factory, results: pd.DataFrame
) -> None:
    study = study_factory(_with_failure(results))
    (study / "runs" / "lora_r2_s1" / "logs" / "metrics.csv").unlink()
    curves, missing = collect_curves(study, _with_failure(results))
    assert missing == ["lora_r2_s1"]
    assert "lora_r16_s2" not in set(curves["run_id"])  # failed runs are not drawn
    log = pd.read_csv(study / "runs" / "lora_r1_s0" / "logs" / "metrics.csv")
    val0 = curves.query("run_id == 'lora_r1_s0' and split == 'validation' and quantity == 'loss'")
    assert val0["value"].tolist() == pytest.approx(log["val_loss"].dropna().tolist())
    fig = plots.draw_curves(study, _with_failure(results))
    assert [ax.get_title() for ax in fig.axes] == [
        "train loss", "train accuracy", "validation loss", "validation accuracy",
    ]  # fmt: skip
    assert "lora_r2_s1" in fig.legends[0].get_title().get_text()
    assert _legend_labels(fig)[:3] == ["pretrain", "full finetune", "LoRA r=1"]


def test_every_plot_writes_a_real_png(study_factory, results: pd.DataFrame) -> None:
    df = _with_failure(results)
    study = study_factory(df)
    assert_png(plots.plot_accuracy_vs_rank(df, study / "rank.png"))
    assert_png(plots.plot_accuracy_vs_params(df, study / "params.png"))
    assert_png(plots.plot_curves(study, df, study / "curves.png"))
    assert_png(plots.plot_per_class(df, study / "per_class.png"))
    assert not list(study.glob(".*.tmp")), "temp files left behind"


def test_regression_curves_have_no_accuracy_column(tmp_path: Path) -> None:
    df = make_regression_results()
    study = write_study(tmp_path / "regression", df, acc=False)
    fig = plots.draw_curves(study, df)
    assert [ax.get_title() for ax in fig.axes] == ["train loss", "validation loss"]
