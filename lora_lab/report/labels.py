"""Labels and formatting of results for the report: which LoRA settings vary, how a value or
a configuration is written, which metric a study is judged by.

The table itself (columns, types, reading) is the result type's, in `lora_lab.results`.
"""

from __future__ import annotations

import math

import pandas as pd

from lora_lab.results import COLUMNS, DERIVED_COLUMNS, ok_runs


def extra_numeric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns beyond the contract (e.g. ``delta_rel_error``), in file order."""
    return [
        c
        for c in df.columns
        if c not in COLUMNS
        and c not in DERIVED_COLUMNS
        and pd.api.types.is_numeric_dtype(df[c])
        and not pd.api.types.is_bool_dtype(df[c])
    ]


def main_metric(df: pd.DataFrame) -> tuple[str, str]:
    """The metric a study is judged by: test accuracy, or test loss for regression studies.

    Returns:
        ``(column, axis label)``.
    """
    if ok_runs(df)["test_acc"].notna().any():
        return "test_acc", "test accuracy"
    return "test_loss", "test loss (log scale; regression study: no accuracy)"


def _varies_within_a_rank(lora: pd.DataFrame, column: str) -> bool:
    """Several values of ``column`` at one rank: a dimension of its own, not a function of r."""
    return bool(len(lora)) and lora.groupby("rank")[column].nunique().max() > 1


def varying_lora_dims(df: pd.DataFrame, tuned: bool = False) -> list[str]:
    """LoRA hyper-parameters besides rank and seed that the finished runs vary.

    A value tied to the rank (``α = r`` for every run) does not count: it is one setting.
    An alpha sweep is reported as ``alpha_per_rank`` when that takes fewer distinct values
    than ``alpha`` (``α ∈ {r, 2r}`` reads as two settings, not as one per rank).

    Args:
        df: A normalized results table.
        tuned: The rows are the learning rates chosen per configuration: the learning rate is
            then a result, not a dimension.

    Returns:
        A sub-list of ``["method", "alpha" | "alpha_per_rank", "learning_rate"]``.
    """
    lora = ok_runs(df, "lora").dropna(subset=["rank"])
    dims = []
    if _varies_within_a_rank(lora, "method"):
        dims.append("method")
    if _varies_within_a_rank(lora, "alpha"):
        by_ratio = lora["alpha_per_rank"].nunique() < lora["alpha"].nunique()
        dims.append("alpha_per_rank" if by_ratio else "alpha")
    if not tuned and _varies_within_a_rank(lora, "learning_rate"):
        dims.append("learning_rate")
    return dims


def fixed_lora_settings(df: pd.DataFrame) -> list[str]:
    """The LoRA hyper-parameters that every finished LoRA run shares, e.g. ``["α=r", "lr=0.001"]``.

    Args:
        df: A normalized results table.
    """
    lora = ok_runs(df, "lora").dropna(subset=["rank"])
    settings = []
    if lora["method"].nunique() == 1 and lora["method"].iloc[0] not in ("", "default"):
        settings.append(str(lora["method"].iloc[0]))
    if lora["alpha"].nunique() == 1:
        settings.append(format_value("alpha", lora["alpha"].iloc[0]))
    elif lora["alpha_per_rank"].nunique() == 1:
        ratio = lora["alpha_per_rank"].iloc[0]
        settings.append("α=r" if ratio == 1 else f"α={ratio:g}r")
    if lora["learning_rate"].nunique() == 1:
        settings.append(format_value("learning_rate", lora["learning_rate"].iloc[0]))
    return settings


def format_value(column: str, value: float) -> str:
    """Short text for a hyper-parameter value, e.g. ``α=16`` or ``lr=0.001``."""
    prefixes = {
        "alpha": "α",
        "alpha_per_rank": "α/r",
        "learning_rate": "lr",
        "rank": "r",
        "seed": "s",
    }
    if column == "method":
        return str(value)
    prefix = prefixes.get(column, column)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return f"{prefix}=?"
    return f"{prefix}={value:g}"


def config_label(row: pd.Series, dims: list[str]) -> str:
    """Label of a run's configuration without its seed: ``LoRA r=8 α=16``, ``full finetune``.

    Args:
        row: One results row.
        dims: The varying LoRA hyper-parameters to include (see :func:`varying_lora_dims`).
    """
    if row["stage"] != "lora":
        return str(row["stage"]).replace("_", " ")
    parts = ["LoRA", format_value("rank", row["rank"])]
    parts += [format_value(d, row[d]) for d in dims]
    return " ".join(parts)


def format_count(count: float) -> str:
    """Human-readable parameter count with three significant digits: 512, 1.2k, 34.5k, 1.2M."""
    if count is None or (isinstance(count, float) and math.isnan(count)):
        return "?"
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= threshold:
            return f"{count / threshold:.3g}{suffix}"
    return f"{count:.0f}"
