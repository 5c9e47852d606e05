"""Reading a study's ``results.csv`` and the small helpers every report piece shares.

The column list below is the contract with ``lora_lab.pipeline``: one row per run, failed runs
kept (with ``status == "failed"`` and empty metrics) so a report can say what went wrong.
Nothing here imports the rest of ``lora_lab``; the report draws only from files.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pandas as pd

from lora_lab.schema import NUMERIC_COLUMNS, OPTIONAL_COLUMNS, RESULT_COLUMNS, STAGE_ORDER

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = RESULT_COLUMNS
TEXT_COLUMNS: tuple[str, ...] = tuple(c for c in REQUIRED_COLUMNS if c not in NUMERIC_COLUMNS)
#: Added by :func:`normalize_results`; not part of the file, never shown as an extra column.
DERIVED_COLUMNS: tuple[str, ...] = ("alpha_per_rank",)


def check_columns(df: pd.DataFrame, source: str | Path) -> None:
    """Raise a one-line ``ValueError`` naming ``source`` and every missing required column.

    Args:
        df: A results table.
        source: What to call the table in the message (usually the csv path).

    Raises:
        ValueError: If any column of ``REQUIRED_COLUMNS`` is absent.
    """
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns and c not in OPTIONAL_COLUMNS]
    if missing:
        raise ValueError(f"{source}: missing required column(s): {', '.join(missing)}")


def normalize_results(df: pd.DataFrame, source: str | Path = "results table") -> pd.DataFrame:
    """Return a copy with the contract's dtypes (numbers float, text ``str``, "" if empty).

    Also adds ``alpha_per_rank`` (see ``DERIVED_COLUMNS``). Idempotent.

    Numbers stay float (not nullable Int64) because ``rank`` and ``alpha`` are empty for
    non-LoRA rows and seaborn/matplotlib handle NaN floats everywhere.

    Args:
        df: A results table as read from csv or built in memory.
        source: Name used in the error message.

    Returns:
        The normalized copy.

    Raises:
        ValueError: If required columns are missing.
    """
    check_columns(df, source)
    out = df.copy()
    for column in OPTIONAL_COLUMNS:
        if column not in out.columns:
            out[column] = ""
    for column in NUMERIC_COLUMNS:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    for column in TEXT_COLUMNS:
        out[column] = out[column].fillna("").astype(str).str.strip()
    out["status"] = out["status"].str.lower()
    # Tables written before methods were a sweep axis: their LoRA runs are plain LoRA.
    out.loc[(out["stage"] == "lora") & (out["method"] == ""), "method"] = "default"
    # α/r is the LoRA scaling; sweeps often tie α to r (α = r, α = 2r), which is one setting.
    # Rounded so that float noise does not split one ratio into several.
    out["alpha_per_rank"] = (out["alpha"] / out["rank"].where(out["rank"] > 0)).round(9)
    return out


def read_results(path: str | Path) -> pd.DataFrame:
    """Read and validate a ``results.csv``.

    Args:
        path: The csv file.

    Returns:
        The normalized table (see :func:`normalize_results`).

    Raises:
        ValueError: If the file is missing, empty, or lacks required columns.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: results file not found")
    try:
        # Text columns as str so that a run_id such as "001" or an empty error stays text.
        df = pd.read_csv(path, dtype=dict.fromkeys(TEXT_COLUMNS, str))
    except pd.errors.EmptyDataError:
        raise ValueError(f"{path}: results file is empty (no header row)") from None
    return normalize_results(df, path)


def ok_mask(df: pd.DataFrame) -> pd.Series:
    """Boolean mask of the runs that finished (``status == "ok"``); anything else counts as failed."""
    return df["status"].astype(str).str.lower().eq("ok")


def ok_runs(df: pd.DataFrame, stage: str | None = None) -> pd.DataFrame:
    """The finished runs, optionally of one stage."""
    rows = df[ok_mask(df)]
    if stage is not None:
        rows = rows[rows["stage"] == stage]
    return rows


def sort_by_stage(df: pd.DataFrame) -> pd.DataFrame:
    """Order rows pretrain, full_finetune, lora (unknown stages last), then by rank/alpha/lr."""
    stage_index = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    key = df["stage"].map(lambda s: stage_index.get(s, len(STAGE_ORDER)))
    present = [c for c in ("rank", "alpha", "learning_rate", "seed") if c in df.columns]
    ordered = df.assign(_stage=key).sort_values(["_stage", *present], kind="stable")
    return ordered.drop(columns="_stage").reset_index(drop=True)


def extra_numeric_columns(df: pd.DataFrame) -> list[str]:
    """Numeric columns beyond the contract (e.g. ``delta_rel_error``), in file order."""
    return [
        c
        for c in df.columns
        if c not in REQUIRED_COLUMNS
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


def parse_per_class(text: str, run_id: str = "?") -> dict[str, float]:
    """Parse a ``per_class_acc`` JSON object; an empty or malformed cell gives ``{}``.

    Malformed cells are logged, not raised: a report should still render around a bad row.
    """
    if not text or text in ("{}", "nan"):
        return {}
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError:
        logger.warning("run %s: per_class_acc is not valid JSON; ignored", run_id)
        return {}
    if not isinstance(parsed, dict):
        logger.warning("run %s: per_class_acc is not a JSON object; ignored", run_id)
        return {}
    return {str(k): float(v) for k, v in parsed.items() if isinstance(v, (int, float))}
