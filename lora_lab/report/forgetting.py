"""Fit and forgetting, measured apart, when a study tests on classes it does not finetune on.

A study that finetunes on some classes and tests on more (`data.test_classes: all`) mixes two
things in its test accuracy: how well the network learnt the finetune classes (*fit*) and how
much it lost on the others (*forgetting*). The rows tell them apart: `train_classes` names the
classes a run trained on, `per_class_acc` its test accuracy on each tested class.

- *Fit* of a run: the mean per-class test accuracy over the finetune classes (the classes its
  validation split holds, so the learning rate is chosen for fit).
- *Other* of a run: the mean per-class test accuracy over the tested classes it never trained
  on; its *drop* is the pretrained network's value minus the run's.

Means of per-class accuracies weigh every class alike (the test accuracy on those classes when
their test sets are of equal size, as in Fashion-MNIST, CIFAR-10 and MNIST's near-equal ones).
Each configuration is shown at its validation-chosen learning rate (`selection.selected_mask`),
with two-sided 95% t intervals over seeds; a drop's interval is the interval of the run mean
shifted by the pretrained value when one pretrained network underlies every run (a fixed
point, not a sample), else Welch's over both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lora_lab.report.labels import config_label, varying_lora_dims
from lora_lab.report.selection import selected_mask
from lora_lab.report.tables import markdown_table
from lora_lab.results import ok_runs, parse_per_class, parse_train_classes

FINETUNE_STAGES = ("full_finetune", "lora")
LEVEL = 0.95


@dataclass(frozen=True)
class ClassSplit:
    """The finetune classes and the tested classes the finetune never sees.

    Attributes:
        finetune: The classes every finetune run trained on, in table order.
        others: The tested classes none of them trained on.
    """

    finetune: tuple[str, ...]
    others: tuple[str, ...]

    def measure(self) -> str:
        """What a verdict judged on fit measures, in a clause."""
        return (
            f"judged on fit: test accuracy on the {len(self.finetune)} finetune classes, as "
            f"validation measures it; forgetting of the other {len(self.others)} is reported "
            "under Fit and forgetting, not judged"
        )


def class_split(df: pd.DataFrame) -> ClassSplit | None:
    """The study's split into finetune and other classes; None when its finetune runs are
    tested on no class they did not train on, or do not say what they trained on (tables from
    before `train_classes`), or trained on different classes (no one split fits them all).

    Args:
        df: A normalized results table.
    """
    runs = ok_runs(df)
    runs = runs[runs["stage"].isin(FINETUNE_STAGES)]
    if runs.empty or "train_classes" not in runs:
        return None
    cells = zip(runs["train_classes"], runs["run_id"], strict=True)
    trained = {tuple(parse_train_classes(text, run_id)) for text, run_id in cells}
    if len(trained) != 1 or not next(iter(trained)):
        return None
    (finetune,) = trained
    tested = dict.fromkeys(name for cell in runs["per_class_acc"] for name in parse_per_class(cell))
    others = tuple(name for name in tested if name not in finetune)
    return ClassSplit(finetune, others) if others else None


def class_means(df: pd.DataFrame, classes: tuple[str, ...]) -> pd.Series:
    """Per row, the mean per-class test accuracy over `classes` (NaN when a row lacks one)."""

    def mean(cell: str, run_id: str) -> float:
        per_class = parse_per_class(cell, run_id)
        values = [per_class.get(name, np.nan) for name in classes]
        return float(np.mean(values)) if values else np.nan

    values = [mean(c, r) for c, r in zip(df["per_class_acc"], df["run_id"], strict=True)]
    return pd.Series(values, index=df.index, dtype=float)


def fit_accuracy(df: pd.DataFrame, split: ClassSplit) -> pd.Series:
    """Per row, its fit: the mean per-class test accuracy over the finetune classes."""
    return class_means(df, split.finetune)


def _interval(values: np.ndarray) -> tuple[float, float, float]:
    """Mean and two-sided 95% t interval; a point without spread, NaN bounds for one value."""
    mean = float(np.mean(values))
    if len(values) < 2:
        return mean, np.nan, np.nan
    if np.ptp(values) == 0:
        return mean, mean, mean
    low, high = stats.ttest_1samp(values, mean).confidence_interval(LEVEL)
    return mean, float(low), float(high)


def _drop(before: np.ndarray, after: np.ndarray) -> tuple[float, float, float]:
    """mean(before) − mean(after) with its 95% interval (see the module docstring)."""
    if len(before) == 1 or np.ptp(before) == 0:
        mean, low, high = _interval(after)
        return float(before[0]) - mean, float(before[0]) - high, float(before[0]) - low
    gap = float(np.mean(before) - np.mean(after))
    if len(after) < 2:
        return gap, np.nan, np.nan
    test = stats.ttest_ind(before, after, equal_var=False)
    low, high = test.confidence_interval(LEVEL)
    return gap, float(low), float(high)


def _cell(mean: float, low: float, high: float, scale: float = 1.0, spec: str = ".4f") -> str:
    """ "0.8512 [0.8401, 0.8623]", or the mean alone without an interval."""
    text = format(scale * mean, spec)
    if np.isnan(low):
        return text
    return f"{text} [{format(scale * low, spec)}, {format(scale * high, spec)}]"


def forgetting_table(df: pd.DataFrame, split: ClassSplit) -> pd.DataFrame:
    """One row per configuration: before finetuning, the full finetune, each LoRA rank.

    Args:
        df: A normalized results table.
        split: From `class_split`.

    Returns:
        Columns ``model, seeds, fit, fit_low, fit_high, other, other_low, other_high, drop,
        drop_low, drop_high`` (accuracies as fractions; NaN bounds without spread to tell).
    """
    runs = df[selected_mask(df) & df.index.isin(ok_runs(df).index)]
    runs = runs.assign(fit=class_means(runs, split.finetune), other=class_means(runs, split.others))
    before = runs.loc[runs["stage"] == "pretrain", "other"].dropna().to_numpy()
    dims = varying_lora_dims(df, tuned=True)
    rows = []
    groups = runs.groupby(runs.apply(lambda row: config_label(row, dims), axis=1), sort=False)
    for label, group in groups:
        group = group.dropna(subset=["fit", "other"])
        if group.empty:
            continue
        row = {"model": "before finetuning" if label == "pretrain" else label, "seeds": len(group)}
        for name in ("fit", "other"):
            keys = (name, f"{name}_low", f"{name}_high")
            row |= dict(zip(keys, _interval(group[name].to_numpy()), strict=True))
        drop = _drop(before, group["other"].to_numpy()) if len(before) else (np.nan,) * 3
        row |= dict(zip(("drop", "drop_low", "drop_high"), drop, strict=True))
        rows.append((group["stage"].iloc[0], group["rank"].iloc[0], row))
    order = {"pretrain": 0, "full_finetune": 1, "lora": 2}
    rows.sort(key=lambda item: (order.get(item[0], 3), np.nan_to_num(item[1])))
    return pd.DataFrame([row for *_, row in rows])


def per_class_change(df: pd.DataFrame) -> pd.DataFrame:
    """Mean per-class test accuracy of each configuration at its chosen learning rate
    (columns), per tested class (rows), with the pretrained network first."""
    runs = df[selected_mask(df) & df.index.isin(ok_runs(df).index)]
    dims = varying_lora_dims(df, tuned=True)
    columns = {}
    labels = runs.apply(lambda row: config_label(row, dims), axis=1)
    for label, group in runs.groupby(labels, sort=False):
        pairs = zip(group["per_class_acc"], group["run_id"], strict=True)
        cells = [parse_per_class(text, run_id) for text, run_id in pairs]
        if any(cells):
            columns["before finetuning" if label == "pretrain" else label] = pd.DataFrame(
                cells
            ).mean()
    return pd.DataFrame(columns)


def forgetting_section(df: pd.DataFrame) -> list[str]:
    """The report's "Fit and forgetting" section; [] when the study tests no class beyond
    those it finetunes on.

    Args:
        df: A normalized results table.
    """
    split = class_split(df)
    if split is None:
        return []
    table = forgetting_table(df, split)
    if table.empty:
        return []
    shown = pd.DataFrame(
        {
            "configuration": table["model"],
            "seeds": table["seeds"],
            "fit: finetune classes": [_cell(r.fit, r.fit_low, r.fit_high) for r in table.itertuples()],
            "other classes": [_cell(r.other, r.other_low, r.other_high) for r in table.itertuples()],
            "drop from before (points)": [
                "" if np.isnan(r.drop) or r.model == "before finetuning"
                else _cell(r.drop, r.drop_low, r.drop_high, 100, ".2f")
                for r in table.itertuples()
            ],
        }
    )  # fmt: skip
    change = per_class_change(df)
    lines = [
        "## Fit and forgetting",
        "",
        f"The finetune stages train on {', '.join(split.finetune)} and are tested on "
        f"{len(split.finetune) + len(split.others)} classes. *Fit* is the mean per-class test "
        f"accuracy on the {len(split.finetune)} finetune classes; *other classes* the same over "
        f"the {len(split.others)} classes no finetune run trains on ({', '.join(split.others)}), "
        "and *drop* how far it fell from the pretrained network (positive: forgotten). Each "
        "configuration at its validation-chosen learning rate; two-sided 95% t intervals over "
        "seeds in brackets. The recommended rank is judged on fit: validation holds only the "
        "finetune classes, so nothing in the study chooses for the other classes.",
        "",
        markdown_table(shown),
    ]
    if not change.empty:
        text = change.map(lambda v: "" if pd.isna(v) else f"{v:.3f}")
        text.insert(
            0, "class", [f"{c} (finetune)" if c in split.finetune else c for c in text.index]
        )
        lines += [
            "Mean test accuracy per class (each configuration at its chosen learning rate):",
            "",
        ]
        lines.append(markdown_table(text.reset_index(drop=True)))
    return lines
