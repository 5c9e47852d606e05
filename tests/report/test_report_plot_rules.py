"""Plots that show the verdict on a methods study with a learning-rate grid: selected rows
only, one line per method, one colour scale, curves told apart by method."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_rgb

from lora_lab.report import plots
from lora_lab.report.lr_heatmap import draw_lr_heatmap
from lora_lab.report.markdown import write_report
from tests.report.fakes import write_study
from tests.report.methods_fakes import RANKS, methods_results

METHODS = ["default", "dora", "loraplus", "pissa", "rslora"]


@pytest.fixture(scope="module")
def methods() -> pd.DataFrame:
    return methods_results()


def _chosen_means(df: pd.DataFrame, method: str) -> np.ndarray:
    """The test accuracy per rank at the chosen (larger, better on validation) lr."""
    rows = df[(df["method"] == method) & (df["learning_rate"] == 1e-2)]
    return rows.groupby("rank")["test_acc"].mean().to_numpy()


def test_params_plot_has_one_line_per_method_at_the_selected_rows(methods: pd.DataFrame) -> None:
    fig = plots.draw_accuracy_vs_params(methods)
    ax = fig.axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines() if ln.get_label().startswith("LoRA")}
    assert sorted(lines) == [f"LoRA {m}" for m in METHODS]  # one line each, not one point
    for method in METHODS:
        # Not pooled over the grid: the pooled mean would be 1 point lower.
        np.testing.assert_allclose(
            lines[f"LoRA {method}"].get_ydata(), _chosen_means(methods, method)
        )
    assert "chosen on validation" in fig.get_suptitle()


def test_rank_plot_has_one_line_per_method_at_the_selected_rows(methods: pd.DataFrame) -> None:
    fig = plots.draw_accuracy_vs_rank(methods)
    legend = {
        t.get_text(): h
        for t, h in zip(fig.legends[0].get_texts(), fig.legends[0].legend_handles, strict=True)
    }
    assert sorted(k for k in legend if k.startswith("LoRA")) == [f"LoRA {m}" for m in METHODS]
    dora = to_rgb(legend["LoRA dora"].get_color())
    (line,) = [
        ln
        for ln in fig.axes[0].get_lines()
        if len(ln.get_xdata()) == len(RANKS) and to_rgb(ln.get_color()) == dora
    ]
    np.testing.assert_allclose(line.get_ydata(), _chosen_means(methods, "dora"))
    gap_lines = [ln for ln in fig.axes[1].get_lines() if ln.get_marker() == "o"]
    assert len(gap_lines) == len(METHODS)  # a gap line per method


def test_heatmap_has_one_colour_scale_and_a_colour_bar(methods: pd.DataFrame) -> None:
    df = methods.copy()
    collapsed = (df["method"] == "pissa") & (df["learning_rate"] == 1e-3)
    df.loc[collapsed, "val_acc"] = 0.19  # a collapsed configuration beside a good one
    fig = draw_lr_heatmap(df)
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [
        "LoRA", "LoRA dora", "LoRA rslora", "LoRA pissa", "LoRA loraplus", "full finetune",
    ]  # fmt: skip
    for ax in panels:  # one scale shared by every panel, from the lowest cell to the highest
        assert ax.collections[0].get_clim() == pytest.approx((0.19, 0.9))
    bars = [ax for ax in fig.axes if ax not in panels]
    assert len(bars) == 1 and bars[0].get_ylabel() == "validation accuracy"


def test_curves_are_told_apart_by_method_and_use_selected_runs(tmp_path: Path) -> None:
    df = methods_results()
    # rsLoRA chooses the smaller learning rate: methods at one rank differ in their choice.
    rslora = df["method"] == "rslora"
    df.loc[rslora, "val_acc"] = np.where(df.loc[rslora, "learning_rate"] == 1e-3, 0.95, 0.5)
    study = write_study(tmp_path / "methods", df)
    fig = plots.draw_curves(study, df)
    ax = fig.axes[-1]  # validation accuracy
    drawn = [ln for ln in ax.get_lines() if len(ln.get_xdata())]
    lora_runs = len(METHODS) * len(RANKS) * 3  # the chosen learning rate only
    assert len(drawn) == 1 + 3 + lora_runs  # + the pretrain and the full finetune's 3 seeds
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert sorted(label for label in legend if label.startswith("LoRA")) == [
        f"LoRA {m} (lighter: smaller rank)"
        for m in ["default", "dora", "loraplus", "pissa", "rslora"]
    ]
    # Each method's lines share its hue: the colours of two methods never coincide.
    colours = {tuple(np.round(to_rgb(ln.get_color()), 3)) for ln in drawn}
    assert len(colours) == 2 + len(METHODS) * len(RANKS)


def test_the_reports_rank_plot_tests_at_the_reports_tolerance(
    tmp_path: Path, methods: pd.DataFrame, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = []
    draw = plots.plot_accuracy_vs_rank

    def spy(df, path, tolerance, confidence):
        seen.append((tolerance, confidence))
        return draw(df, path, tolerance, confidence)

    monkeypatch.setattr(plots, "plot_accuracy_vs_rank", spy)
    write_report(write_study(tmp_path / "methods", methods, metrics=False), tolerance=0.02)
    assert seen == [(0.02, 0.95)]
