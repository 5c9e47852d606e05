"""Validation accuracy over learning rate × rank, with the chosen learning rate marked.

One panel per LoRA method (and one for the full finetune, whose grid has no rank), so a reader
sees whether the grid was wide enough: a chosen cell on the grid's top or bottom row means the
best learning rate may lie outside it (the report says so too).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lora_lab.plotting import new_figure, save_figure, theme
from lora_lab.report.selection import chosen_learning_rates, lr_tuned
from lora_lab.results import normalize_results, ok_runs

HEATMAP_FILE = "lr_heatmap.png"


def _panels(df: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per LoRA method, then the full finetune if it swept learning rates."""
    lora = ok_runs(df, "lora").dropna(subset=["rank", "val_acc"])
    panels = [
        (f"LoRA {method}" if method not in ("", "default") else "LoRA", rows)
        for method, rows in lora.groupby("method", sort=False)
        if rows["learning_rate"].nunique() > 1
    ]
    full = ok_runs(df, "full_finetune").dropna(subset=["val_acc"])
    if full["learning_rate"].nunique() > 1:
        panels.append(("full finetune", full.assign(rank="full")))
    return panels


def plot_lr_heatmap(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Mean validation accuracy over seeds for each learning rate (rows) and rank (columns);
    the chosen learning rate of each rank is outlined. Every panel shares one colour scale,
    shown by one colour bar.

    Args:
        df: The results table.
        path: PNG to write.

    Returns:
        ``path``, or None when no configuration swept learning rates with validation accuracy.
    """
    with theme():
        fig = draw_lr_heatmap(df)
        return None if fig is None else save_figure(fig, path)


def draw_lr_heatmap(df: pd.DataFrame) -> Figure | None:
    """The heatmap's unsaved Figure (see `plot_lr_heatmap`); None when there is nothing."""
    df = normalize_results(df)
    panels = _panels(df) if lr_tuned(df) else []
    if not panels:
        return None
    chosen = chosen_learning_rates(df)
    grids = [_grid(rows) for _, rows in panels]
    # One colour scale across the panels, so that equal colours are equal accuracies.
    low = min(float(grid.min().min()) for grid in grids)
    high = max(float(grid.max().max()) for grid in grids)
    widths = [max(2.2, 0.75 * rows["rank"].nunique() + 1.2) for _, rows in panels]
    with theme():
        fig, axes = new_figure(sum(widths) + 1.6, 3.6, ncols=len(panels), width_ratios=widths)
        for ax, (title, rows), grid in zip(axes[0], panels, grids, strict=True):
            sns.heatmap(grid, annot=True, fmt=".3f", cmap="viridis", vmin=low, vmax=high,
                        cbar=False, ax=ax, annot_kws={"fontsize": 7})  # fmt: skip
            _outline_choices(ax, grid, chosen, rows)
            ax.set_title(title)
            ax.set_xlabel("rank" if title != "full finetune" else "")
            ax.set_ylabel("learning rate")
            ax.set_yticklabels([f"{lr:g}" for lr in grid.index], rotation=0)
            ax.set_xticklabels([f"{c:g}" if not isinstance(c, str) else c for c in grid.columns])
        fig.colorbar(axes[0][0].collections[0], ax=list(axes[0]), label="validation accuracy")
        fig.suptitle("Validation accuracy (mean over seeds); outlined: the learning rate chosen")
    return fig


def _grid(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean val_acc per learning rate (rows, largest first) and rank (columns)."""
    grid = rows.pivot_table(index="learning_rate", columns="rank", values="val_acc")
    return grid.sort_index(ascending=False)


def _outline_choices(ax, grid: pd.DataFrame, chosen: pd.DataFrame, rows: pd.DataFrame) -> None:
    stage = rows["stage"].iloc[0]
    method = rows["method"].iloc[0]
    picks = chosen[(chosen["stage"] == stage) & (chosen["method"] == method)]
    for _, pick in picks.iterrows():
        column = "full" if stage == "full_finetune" else pick["rank"]
        if column not in grid.columns or pick["learning_rate"] not in grid.index:
            continue
        x = list(grid.columns).index(column)
        y = list(grid.index).index(pick["learning_rate"])
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="white", lw=2.5))
        ax.add_patch(Rectangle((x, y), 1, 1, fill=False, edgecolor="black", lw=1.2))
