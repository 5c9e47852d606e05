"""The report's axes helpers and figure legend. The theme, colours and PNG writer it shares
with the analysis are in `lora_lab.plotting`."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

from lora_lab.plotting import FULL_FINETUNE_COLOR, PRETRAIN_COLOR
from lora_lab.report.labels import format_count
from lora_lab.results import ok_runs


def method_colors(count: int) -> list:
    """One qualitative colour per method, in the order given (plain LoRA first): seaborn's
    colorblind palette without its vermilion and grey, which read as the full finetune's red
    and the pretrained model's grey."""
    palette = [c for i, c in enumerate(sns.color_palette("colorblind", 10)) if i not in (3, 7)]
    return [palette[i % len(palette)] for i in range(count)]


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


def draw_baselines(
    ax: Axes, df: pd.DataFrame, metric: str, before: bool = True, spread: bool = False
) -> None:
    """Horizontal reference lines: full finetune (dashed) and the pretrained model (dotted).

    Both are means over the finished runs of that stage; the pretrain row's metric is measured
    on the finetune task, so it is the "before finetuning" level of the same quantity.

    Args:
        ax: The axes.
        df: The rows to draw from (the selected ones, where learning rates were tuned).
        metric: The column drawn.
        before: Also draw the pretrained model's level (which stretches an accuracy axis
            from the LoRA and full-finetune data down to the untrained level).
        spread: Shade the full finetune's mean ± sd over its seeds (two or more).
    """
    stages = (("full_finetune", "--", FULL_FINETUNE_COLOR, "full finetune"),)
    if before:
        stages += (("pretrain", ":", PRETRAIN_COLOR, "before finetuning"),)
    for stage, style, color, name in stages:
        values = ok_runs(df, stage)[metric].dropna()
        if values.empty:
            continue
        mean = float(values.mean())
        ax.axhline(
            mean, ls=style, lw=1.6, color=color, label=f"{name} ({format_metric(metric, mean)})"
        )
        if spread and stage == "full_finetune" and len(values) > 1:
            sd = float(values.std())
            ax.axhspan(mean - sd, mean + sd, color=color, alpha=0.12, lw=0,
                       label=f"{name} ± sd ({len(values)} seeds)")  # fmt: skip


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
