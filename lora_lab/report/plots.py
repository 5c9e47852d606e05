"""Seaborn figures of a study, drawn from its results table only.

Each ``plot_*`` function writes one PNG and returns its path, or returns ``None`` when there is
nothing to draw (e.g. every LoRA run failed). Failed rows are dropped, never raised on. Each
has a ``draw_*`` twin that returns the ``Figure`` unsaved, which is what tests inspect.
"""

from __future__ import annotations

import sys

import matplotlib

# Headless by default (CI, ssh, sweeps); but if the caller already uses pyplot (a notebook),
# keep its backend: switching would close the caller's open figures, and we never use pyplot.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from lora_lab.plotting import (
    FULL_FINETUNE_COLOR,
    LORA_COLOR,
    PRETRAIN_COLOR,
    new_figure,
    save_figure,
    sequential_colors,
    theme,
)
from lora_lab.report.curves import draw_curves, plot_curves
from lora_lab.report.figures import (
    draw_baselines,
    figure_legend,
    format_metric,
    method_colors,
    metric_axis,
    set_count_axis,
    set_rank_axis,
)
from lora_lab.report.labels import (
    fixed_lora_settings,
    format_count,
    format_value,
    main_metric,
    varying_lora_dims,
)
from lora_lab.report.per_class import draw_per_class, per_class_table, plot_per_class
from lora_lab.report.selection import tuned_rows
from lora_lab.report.verdict import (
    CONFIDENCE,
    DEFAULT_TOLERANCE,
    Recommendation,
    level,
    recommend,
)
from lora_lab.results import normalize_results, ok_runs

__all__ = [
    "draw_accuracy_vs_params",
    "draw_accuracy_vs_rank",
    "draw_curves",
    "draw_per_class",
    "per_class_table",
    "plot_accuracy_vs_params",
    "plot_accuracy_vs_rank",
    "plot_curves",
    "plot_per_class",
    "rank_plot_dimensions",
]


def rank_plot_dimensions(df: pd.DataFrame, tuned: bool = False) -> tuple[str | None, str | None]:
    """How the rank plot shows the LoRA hyper-parameters that vary besides rank and seed.

    Returns:
        ``(hue, facet)``: the first varying one of ``method``, ``alpha`` (or
        ``alpha_per_rank``, see :func:`~lora_lab.report.labels.varying_lora_dims`) and
        ``learning_rate`` as hue, the second (if any) as one panel per value: methods are
        told apart by colour, and alpha interacts with rank through the α/r scaling.
    """
    dims = varying_lora_dims(normalize_results(df), tuned)
    return (dims[0] if dims else None), (dims[1] if len(dims) > 1 else None)


def _annotate_params(ax: Axes, lora: pd.DataFrame, metric: str, hue: str | None) -> None:
    """Write the trainable-parameter count just above the highest mean (+sd) at each rank."""
    keys = ["rank", hue] if hue else ["rank"]
    stats = lora.groupby(keys)[metric].agg(["mean", "std"]).fillna({"std": 0.0})
    top = (stats["mean"] + stats["std"]).groupby(level="rank").max()
    params = lora.groupby("rank")["trainable_params"].median()
    for rank, y in top.items():
        ax.annotate(
            format_count(params.get(rank)),
            (rank, y),
            xytext=(0, 7),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=7.5,
            color="0.25",
            # A light backdrop keeps the count readable where it crosses a baseline.
            bbox={
                "boxstyle": "round,pad=0.15",
                "facecolor": "white",
                "edgecolor": "none",
                "alpha": 0.8,
            },
        )


def _hue_style(lora: pd.DataFrame, hue: str | None) -> tuple[pd.DataFrame, dict | None]:
    """The rows with their `_hue` label, and the label → colour palette (None without hue)."""
    lora = lora.assign(
        _hue=lora[hue].map(lambda v: "LoRA " + format_value(hue, v)) if hue else "LoRA"
    )
    if not hue:
        return lora, None
    hue_order = list(dict.fromkeys(lora.sort_values(hue)["_hue"]))
    if hue == "method":  # categories, not an order: default first, in a qualitative palette
        hue_order = sorted(hue_order, key=lambda label: label != "LoRA default")
        return lora, dict(zip(hue_order, method_colors(len(hue_order)), strict=True))
    return lora, dict(zip(hue_order, sequential_colors(hue_order), strict=True))


def seed_note(n_seeds: int) -> str:
    """What a title says about the seeds: their count, or that one seed shows no spread."""
    if n_seeds > 1:
        return f" (mean ± sd over {n_seeds} seeds)"
    return " (one seed: no spread, differences may be noise)"


def draw_accuracy_vs_rank(
    df: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE, confidence: float = CONFIDENCE
) -> Figure | None:
    """LoRA test accuracy (or test loss for regression) against rank; see ``plot_accuracy_vs_rank``."""
    everything = normalize_results(df)
    df, tuned = tuned_rows(everything)
    metric, label = main_metric(df)
    lora = ok_runs(df, "lora").dropna(subset=["rank", metric])
    lora = lora[lora["rank"] > 0]  # a log2 axis cannot show rank 0
    if lora.empty:
        return None
    hue, facet = rank_plot_dimensions(lora, tuned)
    lora, palette = _hue_style(lora, hue)
    panels = sorted(lora[facet].dropna().unique()) if facet else [None]
    n_seeds = int(
        lora.groupby(["rank", "alpha", "learning_rate", "method"], dropna=False).size().max()
    )
    recommendations = recommend(everything, tolerance, confidence) if metric == "test_acc" else []
    with theme():
        rows = 2 if recommendations else 1
        fig, axes = new_figure(4.6 * len(panels) + 1.4, 4.8 + 3.0 * (rows - 1), nrows=rows,
                               ncols=len(panels), height_ratios=[1.6, 1][:rows])  # fmt: skip
        for ax, panel in zip(axes[0], panels, strict=True):
            data = lora if facet is None else lora[lora[facet] == panel]
            # Without hue, name the single line ourselves so it gets a legend entry.
            style = (
                {"hue": "_hue", "hue_order": list(palette), "palette": palette}
                if hue
                else {
                    "color": LORA_COLOR,
                    "label": "LoRA" + (" (mean ± sd)" if n_seeds > 1 else ""),
                }
            )
            sns.lineplot(
                data, x="rank", y=metric, errorbar="sd", marker="o", markersize=7, ax=ax, **style
            )
            metric_axis(ax, metric, label if ax is axes[0][0] else "")
            # The pretrained level would stretch the axis over the whole 0-1 range and hide
            # the gaps that decide the verdict: it is named in the title instead.
            draw_baselines(ax, df, metric, before=False, spread=True)
            _annotate_params(ax, data, metric, "_hue" if hue else None)
            set_rank_axis(ax, lora["rank"].unique())
            ax.margins(y=0.12)
            ax.set_xlabel("LoRA rank r (log₂ scale); numbers: trainable parameters")
            if facet:
                ax.set_title(format_value(facet, panel))
        if recommendations:
            for extra in axes[1][1:]:
                extra.remove()
            draw_gap_panel(axes[1][0], recommendations, tolerance, palette)
            set_rank_axis(axes[1][0], lora["rank"].unique())
        fig.suptitle(_rank_title(df, metric, n_seeds, tuned))
        figure_legend(fig, list(axes.flat) if rows == 1 else [*axes[0], axes[1][0]])
    return fig


def _rank_title(df: pd.DataFrame, metric: str, n_seeds: int, tuned: bool) -> str:
    what = "test accuracy" if metric == "test_acc" else "test loss"
    fixed = ", ".join(fixed_lora_settings(df))
    if tuned:  # the learning rate differs per point: chosen on validation data
        fixed = ", ".join(s for s in [fixed, "lr tuned per point on validation"] if s)
    before = ok_runs(df, "pretrain")[metric].dropna()
    if len(before):
        level = format_metric(metric, float(before.mean()))
        fixed = ", ".join(s for s in [fixed, f"before finetuning: {level} (not drawn)"] if s)
    return f"LoRA {what} vs rank{seed_note(n_seeds)}" + (f"\n{fixed}" if fixed else "")


def draw_gap_panel(
    ax: Axes, recommendations: list[Recommendation], tolerance: float, palette: dict | None
) -> None:
    """Each rank's gap to the full finetune (points) with its two-sided interval, its
    one-sided upper bound (the verdict's test) and the tolerance band below the margin."""
    ax.axhspan(0.0, 100 * tolerance, color="#2e8b57", alpha=0.15, lw=0,
               label=f"within the tolerance ({100 * tolerance:g} point(s))")  # fmt: skip
    ax.axhline(0.0, color=FULL_FINETUNE_COLOR, ls="--", lw=1.2)
    count = len(recommendations)
    for i, rec in enumerate(recommendations):
        tests = sorted(rec.tests, key=lambda t: t.rank)
        # Methods side by side at one rank: a small shift along the log axis.
        ranks = np.array([t.rank for t in tests], dtype=float) * 2 ** (0.09 * (i - (count - 1) / 2))
        gap = np.array([100 * t.interval.gap for t in tests])
        low = np.array([100 * t.interval.low for t in tests])
        high = np.array([100 * t.interval.high for t in tests])
        upper = np.array([100 * t.interval.upper for t in tests])
        name = "LoRA " + rec.method
        color = (palette or {}).get(name, LORA_COLOR)
        ax.errorbar(ranks, gap, yerr=[gap - low, high - gap], fmt="o-", color=color, ms=5,
                    capsize=3, lw=1.2, label=name if count > 1 else None)  # fmt: skip
        ax.plot(ranks, upper, "v", color=color, ms=6, ls="none",
                label=f"one-sided {level(rec.confidence)} upper bound")  # fmt: skip
    ax.set_ylabel("gap to full finetune (points)")
    ax.set_xlabel("LoRA rank r (log₂ scale)")
    ax.set_title(
        "Gap with its two-sided interval; a rank is non-inferior when its upper bound (▼) is "
        "inside the band",
        fontsize=9,
    )


def plot_accuracy_vs_rank(
    df: pd.DataFrame,
    path: str | Path,
    tolerance: float = DEFAULT_TOLERANCE,
    confidence: float = CONFIDENCE,
) -> Path | None:
    """LoRA test accuracy against rank, at each point's chosen learning rate, with the full
    finetune's mean and ± sd band drawn in, and below it each rank's gap to the full finetune.

    Ranks sit on a log2 axis; lines are means over seeds with a ±1 sd band; each rank point
    carries its trainable-parameter count. The accuracy axis fits the LoRA and full-finetune
    data: the level before finetuning is named in the title, not drawn. The gap panel shows
    the verdict's test (`report.verdict`): each rank's gap with its two-sided interval, its
    one-sided upper bound and the tolerance band. A varying ``method``/``alpha``/
    ``learning_rate`` becomes hue (and panels when two vary, see
    :func:`rank_plot_dimensions`). Regression studies (no accuracy) show test loss on a log
    axis instead, and no gap panel.

    Args:
        df: The results table (failed rows are ignored).
        path: PNG to write.
        tolerance: The non-inferiority margin (`report.tolerance`).
        confidence: The one-sided confidence of the verdict's tests.

    Returns:
        ``path``, or ``None`` when no finished LoRA run has a metric.
    """
    with theme():
        fig = draw_accuracy_vs_rank(df, tolerance, confidence)
        return None if fig is None else save_figure(fig, path)


def _params_lines(ax: Axes, lora: pd.DataFrame, metric: str) -> None:
    """LoRA's mean ± sd per rank against its parameters: one line per method; with a single
    method, its points coloured by rank."""
    methods = sorted(lora["method"].unique(), key=lambda m: (m != "default", m))
    colors = dict(zip(methods, method_colors(len(methods)), strict=True))
    for method in methods:
        per_rank = (
            lora[lora["method"] == method]
            .groupby("rank")
            .agg(params=("trainable_params", "median"), mean=(metric, "mean"), std=(metric, "std"))
        )
        several = len(methods) > 1
        ax.plot(per_rank["params"], per_rank["mean"], color=colors[method] if several else "0.7",
                lw=1.3, zorder=1, marker="o" if several else None,
                label=f"LoRA {method}" if several else None)  # fmt: skip
        ax.errorbar(
            per_rank["params"], per_rank["mean"], yerr=per_rank["std"].fillna(0.0),
            fmt="none", ecolor=colors[method] if several else "0.55", capsize=3, zorder=2,
        )  # fmt: skip
        if several:
            continue
        for color, (rank, row) in zip(
            sequential_colors(per_rank.index), per_rank.iterrows(), strict=True
        ):
            ax.scatter(
                row["params"], row["mean"], s=60, color=color, edgecolor="white",
                zorder=3, label=f"LoRA {format_value('rank', rank)}",
            )  # fmt: skip


def draw_accuracy_vs_params(df: pd.DataFrame) -> Figure | None:
    """Accuracy against trainable parameters; see :func:`plot_accuracy_vs_params`."""
    df, tuned = tuned_rows(normalize_results(df))
    metric, label = main_metric(df)
    lora = ok_runs(df, "lora").dropna(subset=["rank", metric, "trainable_params"])
    full = ok_runs(df, "full_finetune").dropna(subset=[metric, "trainable_params"])
    if lora.empty and full.empty:
        return None
    with theme():
        fig, axes = new_figure(7.2, 4.4)
        ax = axes[0][0]
        if not lora.empty:
            _params_lines(ax, lora, metric)
        if not full.empty:
            mean, std = full[metric].mean(), full[metric].std()
            ax.errorbar(
                full["trainable_params"].median(), mean, yerr=0.0 if pd.isna(std) else std,
                fmt="*", ms=15, color=FULL_FINETUNE_COLOR, capsize=3, zorder=4,
                label=f"full finetune ({format_metric(metric, mean)})",
            )  # fmt: skip
        before = ok_runs(df, "pretrain")[metric].dropna()
        if not before.empty:
            value = float(before.mean())
            ax.axhline(
                value, ls=":", lw=1.6, color=PRETRAIN_COLOR,
                label=f"before finetuning ({format_metric(metric, value)})",
            )  # fmt: skip
        metric_axis(ax, metric, label)
        set_count_axis(ax, [*lora["trainable_params"], *full["trainable_params"]])
        ax.margins(x=0.08, y=0.12)
        ax.set_xlabel("trainable parameters (log scale)")
        what = "Test accuracy" if metric == "test_acc" else "Test loss"
        seeds = int(pd.concat([lora, full]).groupby(["stage", "method", "rank"], dropna=False)
                    .size().max())  # fmt: skip
        pooled = [format_value(d, 0).split("=")[0] for d in varying_lora_dims(df, tuned)
                  if d != "method"]  # fmt: skip
        notes = ["each at its learning rate chosen on validation"] if tuned else []
        notes += [f"pooled over {', '.join(pooled)}"] if pooled else []
        fig.suptitle(f"{what} vs trainable parameters{seed_note(seeds)}"
                     + (f"\n{'; '.join(notes)}" if notes else ""))  # fmt: skip
        figure_legend(fig, [ax])
    return fig


def plot_accuracy_vs_params(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Test accuracy against trainable parameters (log x): the cost side of the rank sweep.

    LoRA ranks are points coloured by rank (mean ± sd over seeds) joined in rank order; full
    finetuning is a star; the pretrained model ("before finetuning") a dotted line.

    Args:
        df: The results table (failed rows are ignored).
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when there is neither a LoRA nor a full-finetune result.
    """
    with theme():
        fig = draw_accuracy_vs_params(df)
        return None if fig is None else save_figure(fig, path)
