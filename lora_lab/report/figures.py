"""The report's figures: theme, colours, axes helpers, the figure legend, and the atomic PNG
writer. The analysis draws with them too."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from lora_lab._atomic import atomic_path
from lora_lab.report.labels import format_count
from lora_lab.results import ok_runs

# One colour per role, the same in every figure, so a reader learns them once.
PRETRAIN_COLOR = "0.45"
FULL_FINETUNE_COLOR = "#c0392b"
LORA_COLOR = "#1f6fb4"
LORA_PALETTE = "viridis"


@contextlib.contextmanager
def theme() -> Iterator[None]:
    """Seaborn's whitegrid look, scoped so importing the report never restyles a user's plots."""
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        yield


def new_figure(
    width: float, height: float, nrows: int = 1, ncols: int = 1, **kwargs
) -> tuple[Figure, np.ndarray]:
    """A pyplot-free figure (no global figure registry, nothing to close) and its axes grid.

    Args:
        width: Figure width in inches.
        height: Figure height in inches.
        nrows: Rows of axes.
        ncols: Columns of axes.
        **kwargs: Passed to ``Figure.subplots`` (e.g. ``sharey``).

    Returns:
        ``(figure, axes)`` with ``axes`` always a 2-D array.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kwargs)
    return fig, axes


def sequential_colors(values: Sequence[object]) -> list[tuple[float, float, float]]:
    """One colour per ordered value (ranks, alphas) from a sequential palette: low = dark."""
    return sns.color_palette(LORA_PALETTE, n_colors=max(len(values), 1))


def set_rank_axis(ax: Axes, ranks: Sequence[float]) -> None:
    """A log2 x axis with one tick per rank, labelled 1, 2, 4, ... (not 2^0, 2^1, ...)."""
    ranks = sorted(set(ranks))
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ranks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:g}"))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(ranks[0] / 1.5, ranks[-1] * 1.5)


def set_count_axis(ax: Axes, counts: Sequence[float]) -> None:
    """A log10 x axis whose ticks read as parameter counts: 1k, 10k, 1M.

    Over two decades or less, ticks also sit at 2× and 5× so that the axis has more than
    two labels.
    """
    ax.set_xscale("log")
    low, high = min(counts), max(counts)
    subs = (1.0, 2.0, 5.0) if high / low <= 100 else (1.0,)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: format_count(value)))
    ax.xaxis.set_minor_formatter(NullFormatter())


def format_metric(metric: str, value: float) -> str:
    """Accuracy to three decimals; losses to three significant digits."""
    return f"{value:.3f}" if metric.endswith("acc") else f"{value:.3g}"


def draw_baselines(ax: Axes, df: pd.DataFrame, metric: str) -> None:
    """Horizontal reference lines: full finetune (dashed) and the pretrained model (dotted).

    Both are means over the finished runs of that stage; the pretrain row's metric is measured
    on the finetune task, so it is the "before finetuning" level of the same quantity.
    """
    for stage, style, color, name in (
        ("full_finetune", "--", FULL_FINETUNE_COLOR, "full finetune"),
        ("pretrain", ":", PRETRAIN_COLOR, "before finetuning"),
    ):
        values = ok_runs(df, stage)[metric].dropna()
        if values.empty:
            continue
        mean = float(values.mean())
        ax.axhline(
            mean, ls=style, lw=1.6, color=color, label=f"{name} ({format_metric(metric, mean)})"
        )


def metric_axis(ax: Axes, metric: str, label: str) -> None:
    """Label the y axis with the study's metric; a regression loss goes on a log scale."""
    ax.set_ylabel(label)
    if metric == "test_loss":
        ax.set_yscale("log")


def figure_legend(fig: Figure, axes: Sequence[Axes], note: str | None = None) -> None:
    """Replace per-axes legends by one legend below the plot area, so it never covers data.

    Below rather than beside: constrained layout keeps a bottom legend clear of the suptitle,
    and a row of entries reads well for the few (3-10) entries these figures have. Entries are
    collected over all axes and de-duplicated by label, keeping first-seen order.

    Args:
        fig: The figure.
        axes: Axes whose labelled artists become entries.
        note: Optional small grey line above the entries, e.g. which runs are not shown. (A
            free ``fig.text`` would collide with the legend once ``bbox_inches="tight"`` and
            constrained layout disagree on the figure's extent.)
    """
    entries: dict[str, object] = {}
    for ax in axes:
        handles, labels = ax.get_legend_handles_labels()
        for handle, label in zip(handles, labels, strict=True):
            entries.setdefault(label, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    if entries:
        ncols = min(len(entries), 4 if len(entries) > 6 else 3)
        handles, labels = (
            _row_major(list(entries.values()), ncols),
            _row_major(list(entries), ncols),
        )
        legend = fig.legend(
            handles, labels, loc="outside lower center", ncols=ncols, title=note, frameon=False
        )
        if note:
            legend.get_title().set(fontsize=8, color="0.35")


def _row_major(items: list, ncols: int) -> list:
    """Reorder so that matplotlib's column-by-column legend fill reads left to right.

    Matplotlib gives the first ``len % ncols`` columns one extra entry, which is exactly the
    column layout of a row-major grid whose last row is partly empty.
    """
    return [items[i] for j in range(ncols) for i in range(j, len(items), ncols)]


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Save a figure as PNG atomically; `bbox_inches="tight"` keeps outside legends in frame."""
    path = Path(path)
    with atomic_path(path) as temp, open(temp, "wb") as stream:
        fig.savefig(stream, format="png", dpi=dpi, bbox_inches="tight")
    return path
