"""Per-class accuracy before finetuning and after (full finetune, best LoRA), as grouped bars."""

from __future__ import annotations

import sys

import matplotlib

# Same rule as plots.py: headless unless the caller already chose a pyplot backend.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from lora_lab.report._io import save_figure
from lora_lab.report._style import (
    FULL_FINETUNE_COLOR,
    LORA_COLOR,
    PRETRAIN_COLOR,
    figure_legend,
    new_figure,
    theme,
)
from lora_lab.report.results import (
    config_label,
    normalize_results,
    ok_runs,
    parse_per_class,
    varying_lora_dims,
)


def per_class_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long table ``model, run_id, class, accuracy`` for the per-class comparison.

    Models: the pretrained model ("before finetuning"), full finetuning, and the LoRA
    configuration with the best mean test accuracy among those reporting per-class numbers.
    """
    df = normalize_results(df)
    runs = ok_runs(df)
    parsed = pd.Series(
        [parse_per_class(t, r) for t, r in zip(runs["per_class_acc"], runs["run_id"], strict=True)],
        index=runs.index,
        dtype=object,
    )
    runs = runs.loc[parsed.map(bool).astype(bool)]
    records: list[dict[str, object]] = []

    def add(rows: pd.DataFrame, model: str) -> None:
        for index, run_id in rows["run_id"].items():
            records.extend(
                {"model": model, "run_id": run_id, "class": name, "accuracy": accuracy}
                for name, accuracy in parsed[index].items()
            )

    add(runs[runs["stage"] == "pretrain"], "before finetuning")
    add(runs[runs["stage"] == "full_finetune"], "full finetune")
    lora = runs[(runs["stage"] == "lora") & runs["test_acc"].notna()]
    if not lora.empty:
        dims = varying_lora_dims(df)
        labels = lora.apply(lambda row: config_label(row, dims), axis=1)
        best = lora["test_acc"].groupby(labels).mean().idxmax()
        add(lora[labels == best], f"best {best}")
    return pd.DataFrame(records, columns=["model", "run_id", "class", "accuracy"])


def draw_per_class(df: pd.DataFrame) -> Figure | None:
    """Grouped bars of per-class accuracy; see :func:`plot_per_class`."""
    table = per_class_table(df)
    if table.empty:
        return None
    classes = list(dict.fromkeys(table["class"]))
    models = list(dict.fromkeys(table["model"]))
    colors = {"before finetuning": PRETRAIN_COLOR, "full finetune": FULL_FINETUNE_COLOR}
    palette = {model: colors.get(model, LORA_COLOR) for model in models}
    with theme():
        fig, axes = new_figure(min(22.0, max(7.0, 0.75 * len(classes) + 2.5)), 4.4)
        ax = axes[0][0]
        sns.barplot(
            table, x="class", y="accuracy", hue="model", order=classes, hue_order=models,
            palette=palette, errorbar="sd", err_kws={"linewidth": 1.0}, capsize=0.15, ax=ax,
        )  # fmt: skip
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("class")
        ax.set_ylabel("test accuracy on the class (finetune task)")
        if len(classes) > 8 or max(len(c) for c in classes) > 8:
            ax.tick_params(axis="x", labelrotation=35)
            for tick in ax.get_xticklabels():
                tick.set_horizontalalignment("right")
        spread = (
            " (mean ± sd over seeds)"
            if table.groupby("model")["run_id"].nunique().max() > 1
            else ""
        )
        fig.suptitle(f"Per-class test accuracy, before and after finetuning{spread}")
        figure_legend(fig, [ax])
    return fig


def plot_per_class(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Per-class accuracy before finetuning, after full finetuning and after the best LoRA.

    Bars are means over seeds (±1 sd when there are several).

    Args:
        df: The results table (failed rows are ignored).
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when no finished run has a non-empty ``per_class_acc``.
    """
    with theme():
        fig = draw_per_class(df)
        return None if fig is None else save_figure(fig, path)
