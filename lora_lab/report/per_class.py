"""Per-class accuracy before finetuning and after (full finetune, LoRA), as grouped bars.

The top panel is each class's test accuracy; the bottom one its change from before
finetuning, so that a study which finetunes on some classes and tests on all of them shows at a
glance which classes went up and what the others lost.

Every configuration is drawn at its validation-chosen learning rate (`selection.selected_mask`:
no bar pools learning rates), and when there are too many LoRA configurations to draw, the one
with the best mean validation accuracy stands for them (test data never chooses). What carries
no information is left out: a pretrained network that scores 0 on every tested class (a task
shift: it never learnt them) is no "before" series, and then no change panel either, which
would only repeat the accuracies.
"""

from __future__ import annotations

import sys

import matplotlib

# Same rule as plots.py: headless unless the caller already chose a pyplot backend.
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
from lora_lab.report.figures import figure_legend
from lora_lab.report.labels import config_label, varying_lora_dims
from lora_lab.report.selection import selected_mask
from lora_lab.results import normalize_results, ok_runs, parse_per_class

BEFORE = "before finetuning"
FULL = "full finetune"
#: Up to this many LoRA configurations are drawn each; beyond it, only the best.
MAX_LORA_MODELS = 4


def best_on_validation(rows: pd.DataFrame, labels: pd.Series) -> str | None:
    """The label whose rows have the best mean validation accuracy; None without any."""
    means = rows["val_acc"].groupby(labels).mean().dropna()
    return None if means.empty else str(means.idxmax())


def _lora_models(lora: pd.DataFrame, df: pd.DataFrame) -> dict[str, pd.Series]:
    """Label → row mask of the LoRA configurations to draw: each, or the best on validation
    when there are more than `MAX_LORA_MODELS` (none when no row has a validation accuracy).

    Args:
        lora: Finished LoRA rows at their chosen learning rates, with per-class numbers.
        df: The whole normalized table (for the varying hyper-parameters).
    """
    if lora.empty:
        return {}
    labels = lora.apply(lambda row: config_label(row, varying_lora_dims(df, tuned=True)), axis=1)
    order = lora.assign(label=labels).sort_values(["rank", "label"])["label"].unique()
    if len(order) <= MAX_LORA_MODELS:
        return {label: labels == label for label in order}
    best = best_on_validation(lora, labels)
    return {} if best is None else {f"best {best}": labels == best}


def per_class_table(df: pd.DataFrame) -> pd.DataFrame:
    """Long table ``model, run_id, class, accuracy`` for the per-class comparison.

    Models, each at its validation-chosen learning rate: the pretrained model ("before
    finetuning", left out when it scores 0 on every class), full finetuning, and LoRA: each
    configuration when there are at most ``MAX_LORA_MODELS``, else the one with the best mean
    validation accuracy ("best LoRA r=…"), among the runs reporting per-class numbers.
    """
    df = normalize_results(df)
    runs = ok_runs(df[selected_mask(df)])
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

    pretrain = runs[runs["stage"] == "pretrain"]
    if any(max(parsed[index].values()) > 0 for index in pretrain.index):
        add(pretrain, BEFORE)
    add(runs[runs["stage"] == "full_finetune"], FULL)
    lora = runs[(runs["stage"] == "lora") & runs["test_acc"].notna()]
    for label, mask in _lora_models(lora, df).items():
        add(lora[mask], label)
    return pd.DataFrame(records, columns=["model", "run_id", "class", "accuracy"])


def change_table(table: pd.DataFrame) -> pd.DataFrame:
    """Each finetuned run's per-class accuracy minus the mean before finetuning.

    Args:
        table: A :func:`per_class_table`.

    Returns:
        The rows of the models after finetuning with a ``change`` column, for the classes that
        the pretrained model was also tested on; empty without a "before finetuning" model.
    """
    before = table[table["model"] == BEFORE].groupby("class")["accuracy"].mean()
    after = table[(table["model"] != BEFORE) & table["class"].isin(before.index)]
    return after.assign(change=after["accuracy"] - after["class"].map(before))


def _palette(models: list[str]) -> dict[str, object]:
    """Grey before, red full finetune; LoRA blue, or low-to-high rank colours when several."""
    lora = [model for model in models if model not in (BEFORE, FULL)]
    shades = sequential_colors(lora) if len(lora) > 1 else [LORA_COLOR] * len(lora)
    colors = dict(zip(lora, shades, strict=True))
    return {BEFORE: PRETRAIN_COLOR, FULL: FULL_FINETUNE_COLOR, **colors}


def _bars(ax: Axes, data: pd.DataFrame, y: str, classes: list[str], models: list[str]) -> None:
    sns.barplot(
        data, x="class", y=y, hue="model", order=classes, hue_order=models,
        palette=_palette(models), errorbar="sd", err_kws={"linewidth": 1.0}, capsize=0.15, ax=ax,
    )  # fmt: skip


def draw_per_class(df: pd.DataFrame) -> Figure | None:
    """Grouped bars of per-class accuracy and its change; see :func:`plot_per_class`."""
    table = per_class_table(df)
    if table.empty:
        return None
    classes = list(dict.fromkeys(table["class"]))
    models = list(dict.fromkeys(table["model"]))
    change = change_table(table)
    with theme():
        width = min(22.0, max(7.0, (0.5 + 0.15 * len(models)) * len(classes) + 2.5))
        fig, axes = new_figure(width, 7.6 if len(change) else 4.4, 2 if len(change) else 1, 1)
        ax = axes[0][0]
        _bars(ax, table, "accuracy", classes, models)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("test accuracy on the class")
        if len(change):
            below = axes[1][0]
            _bars(below, change, "change", classes, [m for m in models if m != BEFORE])
            below.axhline(0, color="0.2", lw=1.0)
            below.set_ylabel("change from before finetuning")
            ax.set_xlabel("")
            ax.tick_params(axis="x", labelbottom=False)
        bottom = axes[-1][0]
        bottom.set_xlabel("class")
        if len(classes) > 8 or max(len(c) for c in classes) > 8:
            bottom.tick_params(axis="x", labelrotation=35)
            for tick in bottom.get_xticklabels():
                tick.set_horizontalalignment("right")
        several = table.groupby("model")["run_id"].nunique().max() > 1
        spread = " (mean ± sd over seeds)" if several else ""
        before = "before and after" if BEFORE in models else "after"
        fig.suptitle(f"Per-class test accuracy {before} finetuning (chosen on validation){spread}")
        figure_legend(fig, [row[0] for row in axes])
    return fig


def plot_per_class(df: pd.DataFrame, path: str | Path) -> Path | None:
    """Per-class accuracy before finetuning, after full finetuning and after LoRA.

    Top: each class's test accuracy. Bottom (when the pretrained model has per-class
    numbers, not all 0): the change from before finetuning. Each configuration at its
    validation-chosen learning rate; LoRA is each configuration when there are at most
    ``MAX_LORA_MODELS`` (coloured low to high rank), else the best on validation. Bars are means
    over seeds (±1 sd when there are several).

    Args:
        df: The results table (failed rows are ignored).
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when no finished run has a non-empty ``per_class_acc``.
    """
    with theme():
        fig = draw_per_class(df)
        return None if fig is None else save_figure(fig, path)
