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


def draw_accuracy_vs_rank(df: pd.DataFrame) -> Figure | None:
    """LoRA test accuracy (or test loss for regression) against rank; see ``plot_accuracy_vs_rank``."""
    df, tuned = tuned_rows(normalize_results(df))
    metric, label = main_metric(df)
    lora = ok_runs(df, "lora").dropna(subset=["rank", metric])
    lora = lora[lora["rank"] > 0]  # a log2 axis cannot show rank 0
    if lora.empty:
        return None
    hue, facet = rank_plot_dimensions(lora, tuned)
    lora = lora.assign(
        _hue=lora[hue].map(lambda v: "LoRA " + format_value(hue, v)) if hue else "LoRA"
    )
    hue_order = list(dict.fromkeys(lora.sort_values(hue)["_hue"])) if hue else None
    if hue == "method":  # categories, not an order: default first, in a qualitative palette
        hue_order = sorted(hue_order or [], key=lambda label: label != "LoRA default")
        colors = sns.color_palette("colorblind", n_colors=len(hue_order))
    else:
        colors = sequential_colors(hue_order) if hue else []
    palette = dict(zip(hue_order, colors, strict=True)) if hue else None
    panels = sorted(lora[facet].dropna().unique()) if facet else [None]
    n_seeds = int(
        lora.groupby(["rank", "alpha", "learning_rate", "method"], dropna=False).size().max()
    )
    with theme():
        fig, axes = new_figure(4.6 * len(panels) + 1.4, 4.8, ncols=len(panels), sharey=True)
        for ax, panel in zip(axes[0], panels, strict=True):
            data = lora if facet is None else lora[lora[facet] == panel]
            # Without hue, name the single line ourselves so it gets a legend entry.
            style = (
                {"hue": "_hue", "hue_order": hue_order, "palette": palette}
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
            draw_baselines(ax, df, metric)
            _annotate_params(ax, data, metric, "_hue" if hue else None)
            set_rank_axis(ax, lora["rank"].unique())
            ax.margins(y=0.12)
            ax.set_xlabel("LoRA rank r (log₂ scale); numbers: trainable parameters")
            if facet:
                ax.set_title(format_value(facet, panel))
        what = "test accuracy" if metric == "test_acc" else "test loss"
        seeds = f" (mean ± sd over {n_seeds} seeds)" if n_seeds > 1 else ""
        fixed = ", ".join(fixed_lora_settings(df))
        if tuned:  # the learning rate differs per point: chosen on validation data
            fixed = ", ".join(s for s in [fixed, "lr tuned per point on validation"] if s)
        fig.suptitle(f"LoRA {what} vs rank{seeds}" + (f"\n{fixed}" if fixed else ""))
        figure_legend(fig, list(axes[0]))
    return fig


def plot_accuracy_vs_rank(df: pd.DataFrame, path: str | Path) -> Path | None:
    """LoRA test accuracy against rank, with the full-finetune and pretrained levels drawn in.

    Ranks sit on a log2 axis; lines are means over seeds with a ±1 sd band; each rank point
    carries its trainable-parameter count. A varying ``alpha``/``learning_rate`` becomes hue
    (and panels when both vary, see :func:`rank_plot_dimensions`). Regression studies (no
    accuracy) show test loss on a log axis instead.

    Args:
        df: The results table (failed rows are ignored).
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when no finished LoRA run has a metric.
    """
    with theme():
        fig = draw_accuracy_vs_rank(df)
        return None if fig is None else save_figure(fig, path)


def draw_accuracy_vs_params(df: pd.DataFrame) -> Figure | None:
    """Accuracy against trainable parameters; see :func:`plot_accuracy_vs_params`."""
    df = normalize_results(df)
    metric, label = main_metric(df)
    lora = ok_runs(df, "lora").dropna(subset=["rank", metric, "trainable_params"])
    full = ok_runs(df, "full_finetune").dropna(subset=[metric, "trainable_params"])
    if lora.empty and full.empty:
        return None
    with theme():
        fig, axes = new_figure(7.2, 4.4)
        ax = axes[0][0]
        if not lora.empty:
            # Seeds (and any alpha/lr variants) of one rank share a parameter count: one point.
            per_rank = lora.groupby("rank").agg(
                params=("trainable_params", "median"),
                mean=(metric, "mean"),
                std=(metric, "std"),
            )
            ax.plot(per_rank["params"], per_rank["mean"], color="0.7", lw=1.3, zorder=1)
            ax.errorbar(
                per_rank["params"], per_rank["mean"], yerr=per_rank["std"].fillna(0.0),
                fmt="none", ecolor="0.55", capsize=3, zorder=2,
            )  # fmt: skip
            for color, (rank, row) in zip(
                sequential_colors(per_rank.index), per_rank.iterrows(), strict=True
            ):
                ax.scatter(
                    row["params"], row["mean"], s=60, color=color, edgecolor="white",
                    zorder=3, label=f"LoRA {format_value('rank', rank)}",
                )  # fmt: skip
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
        fig.suptitle(f"{what} vs trainable parameters")
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
