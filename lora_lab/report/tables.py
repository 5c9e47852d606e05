"""The study's tables: the per-configuration summary and a small Markdown table formatter.

Markdown is written by hand because ``DataFrame.to_markdown`` needs ``tabulate``, which is not
a dependency; the tables here are small and a pipe table is a few lines.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from lora_lab.report.labels import extra_numeric_columns, main_metric
from lora_lab.results import diverged_mask, normalize_results, ok_mask, ok_runs, sort_by_stage

GROUP_KEYS: list[str] = ["stage", "method", "rank", "alpha", "learning_rate"]


def _metric_columns(df: pd.DataFrame) -> list[str]:
    return ["test_acc", "test_loss", "source_test_acc", *extra_numeric_columns(df)]


def summary_table(df: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration (stage, rank, alpha, learning_rate), aggregated over seeds.

    Args:
        df: A results table (raw or normalized; validated here).

    Returns:
        Columns ``stage, method, rank, alpha, learning_rate, n_seeds, failed, diverged``, then
        ``<m>_mean`` and ``<m>_std`` for ``m`` in ``test_acc, test_loss, source_test_acc`` and
        any numeric extra column, then ``trainable_params, total_params, pct_trainable,
        train_seconds_mean``. ``n_seeds`` counts finished runs, ``failed`` the others,
        ``diverged`` those of them the pipeline marked diverged; means and sample standard
        deviations (ddof=1, NaN for a single seed) use finished runs only. Parameter counts
        come from any row of the configuration, since they do not depend on a run finishing.

    Raises:
        ValueError: If required columns are missing.
    """
    df = normalize_results(df)
    metrics = _metric_columns(df)
    full_params = df.loc[df["stage"] == "full_finetune", "trainable_params"].median()
    full_params = 0.0 if pd.isna(full_params) else float(full_params)
    rows: list[dict[str, object]] = []
    for key, group in df.groupby(GROUP_KEYS, dropna=False, sort=False):
        done = group[ok_mask(group)]
        row: dict[str, object] = dict(zip(GROUP_KEYS, key, strict=True))
        row["n_seeds"] = len(done)
        row["failed"] = len(group) - len(done)
        row["diverged"] = int(diverged_mask(group).sum())
        for metric in metrics:
            row[f"{metric}_mean"] = done[metric].mean()
            row[f"{metric}_std"] = done[metric].std()
        row["trainable_params"] = group["trainable_params"].median()
        row["total_params"] = group["total_params"].median()
        # One definition everywhere (this table, the headline, the recommended rank): the
        # share of the full finetune's trainable parameters, i.e. of the network itself.
        base = full_params if full_params > 0 else row["total_params"]
        row["pct_trainable"] = 100.0 * row["trainable_params"] / base if base > 0 else math.nan
        row["train_seconds_mean"] = done["train_seconds"].mean()
        rows.append(row)
    columns = [*GROUP_KEYS, "n_seeds", "failed", "diverged"]
    columns += [f"{m}_{s}" for m in metrics for s in ("mean", "std")]
    columns += ["trainable_params", "total_params", "pct_trainable", "train_seconds_mean"]
    return sort_by_stage(pd.DataFrame(rows, columns=columns))


def _is_missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fmt(spec: str) -> Callable[[object], str]:
    return lambda value: "" if _is_missing(value) else format(value, spec)


def _count(value: object) -> str:
    return "" if _is_missing(value) else f"{int(value):,}"


def _metric_format(metric: str) -> str:
    return ".4f" if metric.endswith("acc") else ".4g"


def _mean_std(mean: object, std: object, spec: str) -> str:
    """``0.9120 ± 0.0040``, or just the mean when there is no spread to show.

    Accuracies share fixed decimals so means and spreads line up; other metrics (losses,
    errors) span decades, so their spread gets two significant digits of its own.
    """
    if _is_missing(mean):
        return ""
    if _is_missing(std):
        return format(mean, spec)
    return f"{mean:{spec}} ± {std:{spec if spec.endswith('f') else '.2g'}}"


def _drop_empty(frame: pd.DataFrame, keep: tuple[str, ...]) -> pd.DataFrame:
    """Drop display columns where every cell is blank (e.g. accuracy in a regression study)."""
    empty = [c for c in frame.columns if c not in keep and frame[c].eq("").all()]
    return frame.drop(columns=empty)


def format_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Text version of :func:`summary_table` for the report: ``mean ± std`` cells, blank NaNs."""
    shown = pd.DataFrame(
        {
            "stage": summary["stage"],
            "method": summary["method"].fillna("").astype(str),
            "rank": summary["rank"].map(_fmt("g")),
            "α": summary["alpha"].map(_fmt("g")),
            "lr": summary["learning_rate"].map(_fmt("g")),
            "seeds": summary["n_seeds"].map(_count),
            "failed": summary["failed"].map(lambda n: str(int(n)) if n else ""),
            "diverged": summary["diverged"].map(lambda n: str(int(n)) if n else ""),
        }
    )
    metrics = [c.removesuffix("_mean") for c in summary.columns if c.endswith("_mean")]
    for metric in (m for m in metrics if m != "train_seconds"):
        spec = _metric_format(metric)
        shown[metric] = [
            _mean_std(mean, std, spec)
            for mean, std in zip(summary[f"{metric}_mean"], summary[f"{metric}_std"], strict=True)
        ]
    shown["trainable params"] = summary["trainable_params"].map(_count)
    shown["total params"] = summary["total_params"].map(_count)
    shown["% of full FT params"] = summary["pct_trainable"].map(
        lambda v: "" if _is_missing(v) else f"{v:.3g}%"
    )
    shown["train s (mean)"] = summary["train_seconds_mean"].map(_fmt(".1f"))
    if shown["method"].replace("", pd.NA).dropna().nunique() <= 1:
        shown = shown.drop(columns="method")  # one method: nothing to tell apart
    return _drop_empty(shown, keep=("stage", "seeds"))


def method_comparison(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]] | None:
    """Methods × ranks: the main metric per method and rank (mean ± sd over seeds), the best
    method at each rank, and one sentence per rank on by how much it wins (accuracy margins
    in points) and whether that is more than the seeds' spread.

    Runs that differ in other LoRA settings too (α, lr) are pooled; the caller says so.

    Args:
        df: A results table.

    Returns:
        ``(table, sentences)``, or None when the finished LoRA runs have fewer than 2 methods.
    """
    df = normalize_results(df)
    lora = ok_runs(df, "lora").dropna(subset=["rank"])
    metric, _label = main_metric(df)
    if lora["method"].nunique() < 2:
        return None
    higher = metric != "test_loss"
    stats = lora.groupby(["rank", "method"])[metric].agg(["mean", "std", "count"])
    methods = sorted(lora["method"].unique(), key=lambda m: (m != "default", m))
    spec = _metric_format(metric)
    # Accuracy differences read in points (0.012 → 1.2 points), losses as they are.
    scale, unit, gap = (100.0, " points", ".2f") if higher else (1.0, "", spec)
    rows, sentences = [], []
    for rank, by_method in stats.groupby(level="rank"):
        by_method = by_method.droplevel("rank")
        ranked = by_method.sort_values("mean", ascending=not higher)
        best, best_row = ranked.index[0], ranked.iloc[0]
        row: dict[str, object] = {"rank": f"{rank:g}"}
        for method in methods:
            cell = by_method.loc[method] if method in by_method.index else None
            text = "" if cell is None else _mean_std(cell["mean"], cell["std"], spec)
            row[method] = text
        if len(ranked) > 1:
            second, second_row = ranked.index[1], ranked.iloc[1]
            margin = abs(best_row["mean"] - second_row["mean"]) * scale
            row["best"] = f"{best} (+{margin:{gap}}{unit} over {second})"
            seeds = int(min(best_row["count"], second_row["count"]))
            if seeds > 1:
                spread = max(_zero(best_row["std"]), _zero(second_row["std"])) * scale
                verdict = "within" if margin <= spread else "beyond"
                how = f"{verdict} the seed spread: sd up to {spread:{gap}}{unit} over {seeds} seeds"
            else:
                how = "one seed: no spread to compare with"
            sentences.append(
                f"- rank {rank:g}: **{best}** wins by {margin:{gap}}{unit} over {second} ({how})."
            )
        rows.append(row)
    return pd.DataFrame(rows), sentences


def _zero(value: object) -> float:
    return 0.0 if _is_missing(value) else float(value)  # type: ignore[arg-type]


def format_runs(df: pd.DataFrame) -> pd.DataFrame:
    """Text table of every run (one row each) for the report's "All runs" block."""
    df = sort_by_stage(normalize_results(df))
    shown = pd.DataFrame(
        {
            "run_id": df["run_id"],
            "stage": df["stage"],
            "rank": df["rank"].map(_fmt("g")),
            "α": df["alpha"].map(_fmt("g")),
            "seed": df["seed"].map(_fmt("g")),
            "lr": df["learning_rate"].map(_fmt("g")),
            "trainable params": df["trainable_params"].map(_count),
        }
    )
    for metric in _metric_columns(df):
        shown[metric] = df[metric].map(_fmt(_metric_format(metric)))
    shown["train s"] = df["train_seconds"].map(_fmt(".1f"))
    shown["epochs"] = df["epochs"].map(_fmt("g"))
    shown["status"] = df["status"]
    return _drop_empty(shown, keep=("run_id", "stage", "status"))


def markdown_table(frame: pd.DataFrame, max_rows: int | None = None) -> str:
    """Render a frame as a GitHub pipe table; numeric-looking columns are right-aligned.

    Args:
        frame: Any frame; cells are converted with ``str`` (NaN shown blank).
        max_rows: Show at most this many rows and say how many were left out.

    Returns:
        The table text, ending with a newline.
    """
    total = len(frame)
    if max_rows is not None:
        frame = frame.head(max_rows)

    def cell(value: object) -> str:
        text = "" if _is_missing(value) else str(value)
        # A pipe or newline inside a cell would break the table's row structure.
        return " ".join(text.split()).replace("|", "\\|")

    cells = frame.map(cell) if not frame.empty else frame.astype(str)
    right = [pd.api.types.is_numeric_dtype(frame[c]) or _looks_numeric(cells[c]) for c in frame]
    header = "| " + " | ".join(cell(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---:" if r else ":---" for r in right) + "|"
    body = ["| " + " | ".join(row) + " |" for row in cells.itertuples(index=False)]
    lines = [header, rule, *body]
    if total > len(frame):
        lines.append(f"\n_({total - len(frame)} more rows not shown)_")
    return "\n".join(lines) + "\n"


def _looks_numeric(column: pd.Series) -> bool:
    """True when every non-blank cell starts like a number ("0.91 ± 0.01", "1,234", "12%")."""
    filled = column[column != ""]
    return bool(len(filled)) and filled.str.match(r"^[-+]?[\d.]").all()
