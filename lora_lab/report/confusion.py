"""Test confusion matrices of the configurations chosen on validation: `confusion.png` and
`confusion.csv` in the study folder, drawn from the `confusion` column of results.csv.

Three models: the pretrained network ("before finetuning"), the full finetune and the best
LoRA configuration, each at its validation-chosen learning rate (`selection.selected_mask`),
the best LoRA being the configuration with the best mean validation accuracy (test data never
chooses). A model's matrix sums its runs' counts over seeds; each row (a true class) is shown
as the share of that class's test examples predicted as each class, so "Dress is absorbed into
Shirt" reads as a large off-diagonal cell in Dress's row.
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
from matplotlib.figure import Figure

from lora_lab._atomic import atomic_write_text
from lora_lab.plotting import new_figure, save_figure, theme
from lora_lab.report.labels import config_label, varying_lora_dims
from lora_lab.report.per_class import BEFORE, FULL, best_on_validation
from lora_lab.report.selection import selected_mask
from lora_lab.results import ok_runs, parse_confusion

CONFUSION_PNG = "confusion.png"
CONFUSION_CSV = "confusion.csv"


def _summed(rows: pd.DataFrame) -> pd.DataFrame | None:
    """The runs' confusion counts summed over seeds; None when no run has one."""
    parsed = [parse_confusion(c, r) for c, r in zip(rows["confusion"], rows["run_id"], strict=True)]
    matrices = [m for m in parsed if m is not None]
    if not matrices:
        return None
    return sum(matrices[1:], matrices[0]).fillna(0)


def chosen_confusions(df: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, int]]:
    """Model label → (confusion counts [true × predicted] summed over seeds, run count) of the
    pretrained network, the full finetune and the best LoRA on validation (see the module
    docstring); models without confusion counts are left out.

    Args:
        df: A normalized results table.
    """
    if "confusion" not in df or not df["confusion"].astype(bool).any():
        return {}
    runs = ok_runs(df[selected_mask(df)])
    runs = runs[runs["confusion"].astype(bool)]
    lora = runs[runs["stage"] == "lora"]
    labels = lora.apply(lambda row: config_label(row, varying_lora_dims(df, tuned=True)), axis=1)
    best = best_on_validation(lora, labels) if len(lora) else None
    models = {
        BEFORE: runs[runs["stage"] == "pretrain"],
        FULL: runs[runs["stage"] == "full_finetune"],
        **({} if best is None else {f"best on validation: {best}": lora[labels == best]}),
    }
    summed = {name: (_summed(rows), len(rows)) for name, rows in models.items() if len(rows)}
    return {name: (matrix, n) for name, (matrix, n) in summed.items() if matrix is not None}


def confusion_table(confusions: dict[str, tuple[pd.DataFrame, int]]) -> pd.DataFrame:
    """Long table ``model, runs, true, predicted, count, share`` (share: of the true class's
    test examples), the file `confusion.csv` holds."""
    frames = []
    for name, (matrix, runs) in confusions.items():
        share = matrix.div(matrix.sum(axis=1).where(lambda total: total > 0), axis=0)
        long = matrix.stack().rename("count").to_frame().join(share.stack().rename("share"))
        long.index.names = ["true", "predicted"]
        frames.append(long.reset_index().assign(model=name, runs=runs))
    columns = ["model", "runs", "true", "predicted", "count", "share"]
    return (
        pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)
    )


def draw_confusion(confusions: dict[str, tuple[pd.DataFrame, int]]) -> Figure:
    """One heatmap per model, rows the true classes, one colour scale (0–1) and one colour
    bar for all panels, each cell the share of the row's test examples (in %)."""
    count = len(confusions)
    size = max(len(m.columns) for m, _ in confusions.values())
    side = max(3.2, 0.42 * size + 1.6)
    fig, axes = new_figure(side * count + 1.0, side + 0.6, 1, count, sharey=True)
    for index, (ax, (name, (matrix, runs))) in enumerate(zip(axes[0], confusions.items(), strict=True)):  # fmt: skip
        share = matrix.div(matrix.sum(axis=1).where(lambda total: total > 0), axis=0)
        last = index == count - 1
        sns.heatmap(
            100 * share, ax=ax, vmin=0, vmax=100, cmap="Blues", annot=size <= 12, fmt=".0f",
            annot_kws={"fontsize": 7}, cbar=last, square=True, linewidths=0.3, linecolor="0.9",
            cbar_kws={"label": "% of the true class's test examples"} if last else None,
        )  # fmt: skip
        seeds = f"{runs} run{'s' if runs > 1 else ''}"
        ax.set_title(f"{name}\n({seeds})", fontsize=9)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class" if index == 0 else "")
        ax.tick_params(axis="x", labelrotation=60)
    fig.suptitle("Test confusion matrices, chosen on validation (rows sum to 100%)")
    return fig


def write_confusion(df: pd.DataFrame, study: str | Path) -> Path | None:
    """Write `confusion.png` and `confusion.csv` into `study`; returns the PNG's path, or None
    (and removes stale files) when no chosen configuration has confusion counts.

    Args:
        df: A normalized results table.
        study: The study folder.
    """
    study = Path(study)
    confusions = chosen_confusions(df)
    if not confusions:
        (study / CONFUSION_CSV).unlink(missing_ok=True)
        return None
    table = confusion_table(confusions)
    atomic_write_text(study / CONFUSION_CSV, table.to_csv(index=False, float_format="%.6g"))
    with theme():
        return save_figure(draw_confusion(confusions), study / CONFUSION_PNG)
