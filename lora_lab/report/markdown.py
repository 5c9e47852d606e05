"""``report.md`` of a study folder: tables, plots and provenance, from results files only."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lora_lab._atomic import atomic_write_text
from lora_lab.report import plots
from lora_lab.report.certificate import certificate_section
from lora_lab.report.confusion import CONFUSION_PNG, write_confusion
from lora_lab.report.curves import metrics_path
from lora_lab.report.forgetting import forgetting_section
from lora_lab.report.labels import format_value, main_metric, varying_lora_dims
from lora_lab.report.lr_heatmap import HEATMAP_FILE, plot_lr_heatmap
from lora_lab.report.provenance import (
    analysis_section,
    command_and_environment,
    config_section,
    read_study_json,
)
from lora_lab.report.rank_table import recommended_section
from lora_lab.report.selection import chosen_learning_rates, lr_tuned, tuned_rows
from lora_lab.report.tables import (
    format_runs,
    format_summary,
    markdown_table,
    method_comparison,
    summary_table,
)
from lora_lab.report.verdict import DEFAULT_MAX_SEEDS, DEFAULT_TOLERANCE, study_confidence
from lora_lab.results import diverged_mask, normalize_results, ok_mask, ok_runs, read_results

__all__ = ["summary_table", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
# (file name, section title, drawer) in report order; drawers take (study_dir, df, path).
PLOTS: list[tuple[str, str, Callable[[Path, pd.DataFrame, Path], Path | None]]] = [
    ("accuracy_vs_rank.png", "Accuracy vs LoRA rank",
     lambda study, df, path: plots.plot_accuracy_vs_rank(df, path)),
    (HEATMAP_FILE, "Validation accuracy: learning rate × rank",
     lambda study, df, path: plot_lr_heatmap(df, path)),
    ("accuracy_vs_params.png", "Accuracy vs trainable parameters",
     lambda study, df, path: plots.plot_accuracy_vs_params(df, path)),
    ("curves.png", "Training and validation curves", plots.plot_curves),
    ("per_class.png", "Per-class accuracy",
     lambda study, df, path: plots.plot_per_class(df, path)),
    (CONFUSION_PNG, "Confusion matrices (confusion.csv)",
     lambda study, df, path: write_confusion(df, study)),
]  # fmt: skip


def _headline(df: pd.DataFrame) -> list[str]:
    """Three bullets a reader wants first: before finetuning, full finetune, best LoRA."""
    metric, _ = main_metric(df)
    name = "test accuracy" if metric == "test_acc" else "test loss"
    spec = ".4f" if metric == "test_acc" else ".4g"

    def stat(values: pd.Series) -> str:
        values = values.dropna()
        spread = f" ± {values.std():{spec}}" if len(values) > 1 else ""
        return f"{values.mean():{spec}}{spread}"

    lines: list[str] = []
    pretrain = ok_runs(df, "pretrain")
    if pretrain[metric].notna().any():
        source = pretrain["source_test_acc"].dropna()
        extra = f" (on its own pretraining task: {source.mean():.4f})" if len(source) else ""
        lines.append(f"- Before finetuning: {name} {stat(pretrain[metric])}{extra}.")
    full = ok_runs(df, "full_finetune")
    full_params = full["trainable_params"].median()
    if full[metric].notna().any():
        lines.append(
            f"- Full finetune: {name} {stat(full[metric])}, "
            f"{full_params:,.0f} trainable parameters."
        )
    lora = ok_runs(df, "lora").dropna(subset=[metric])
    if not lora.empty:
        # str() of each value, NaN included, so a row with a missing alpha still has a key.
        keys = lora["rank"].map(str) + "/" + lora["alpha"].map(str)
        keys += "/" + lora["learning_rate"].map(str) + "/" + lora["method"].map(str)
        # The best configuration on validation (test data never chooses); without val_acc
        # (regression), the lowest test loss, as there is nothing else to choose by.
        by_validation = bool(lora["val_acc"].notna().any())
        if by_validation:
            best = lora.groupby(keys)["val_acc"].mean().idxmax()
        else:
            means = lora.groupby(keys)[metric].mean()
            best = means.idxmax() if metric == "test_acc" else means.idxmin()
        rows = lora[keys == best]
        params = rows["trainable_params"].median()
        share = (
            f" ({100 * params / full_params:.3g}% of full finetune's)" if full_params > 0 else ""
        )
        shown = ("method",) if lora["method"].nunique() > 1 else ()
        config = " ".join(
            format_value(k, rows[k].iloc[0]) for k in (*shown, "rank", "alpha", "learning_rate")
        )
        lines.append(
            f"- Best LoRA{' on validation' if by_validation else ''} ({config}): {name} "
            f"{stat(rows[metric])}, "
            f"{params:,.0f} trainable parameters{share}."
        )
    return lines


def _short_error(error: str, limit: int = 240) -> str:
    """The informative line of an error: a traceback's last line, else the first line."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "(no error message recorded)"
    line = lines[-1] if lines[0].startswith("Traceback") else lines[0]
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _draw_plots(study: Path, df: pd.DataFrame) -> list[str]:
    """Draw every plot into the study folder and return the report's Plots section."""
    lines = ["## Plots", ""]
    skipped: list[str] = []
    metric, _ = main_metric(df)
    for file_name, title, draw in PLOTS:
        target = study / file_name
        try:
            drawn = draw(study, df, target)
        except Exception as error:
            # One broken figure must not cost the reader the tables and the other figures.
            logger.exception("drawing %s failed", file_name)
            lines += [f"### {title}", "", f"_Not drawn: {type(error).__name__}: {error}_", ""]
            continue
        if drawn is None:
            # The report owns this name: a figure left from an earlier report would be stale.
            target.unlink(missing_ok=True)
            skipped.append(f"`{file_name}`")
            continue
        if metric == "test_loss":  # a regression study: its plots show the loss
            title = title.replace("Accuracy", "Test loss")
        lines += [f"### {title}", "", f"![{title}]({file_name})", ""]
        if file_name == "curves.png":
            missing = [
                row["run_id"]
                for _, row in ok_runs(df).iterrows()
                if not (path := metrics_path(study, row["run_dir"])) or not path.is_file()
            ]
            if missing:
                lines += [f"_No `logs/metrics.csv` (skipped): {', '.join(missing)}._", ""]
    if skipped:
        lines += [f"Not drawn, nothing to show: {', '.join(skipped)}.", ""]
    return lines


def study_tolerance(info: dict) -> float:
    """`report.tolerance` of the study's config (study.json), else the default (1 point)."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    value = (config.get("report") or {}).get("tolerance")
    return float(value) if isinstance(value, (int, float)) else DEFAULT_TOLERANCE


def study_level(info: dict) -> float:
    """The one-sided confidence of the study's tests: 95%, split over the looks when its config
    (study.json) has `sweep.seeds=auto` (a bare table: 95%)."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    auto = (config.get("sweep") or {}).get("seeds") == "auto"
    max_seeds = (config.get("report") or {}).get("max_seeds")
    return study_confidence(auto, max_seeds if isinstance(max_seeds, int) else DEFAULT_MAX_SEEDS)


def _who(row: pd.Series) -> str:
    if pd.isna(row["rank"]):
        return "the full finetune:"
    return f"{row['stage']} {row['method']} r={row['rank']:g}:"


def _choice_notes(chosen: pd.DataFrame) -> list[str]:
    """Bullets on choices at a grid edge (a bound) and on ties (the best mean still wins)."""
    notes = []
    for _, row in chosen[chosen["at_edge"]].iterrows():
        end, side = (
            ("smallest", "below")
            if row["learning_rate"] == row["grid"][0]
            else ("largest", "above")
        )
        past = [v for v in row["failed_lrs"] if (v > row["learning_rate"]) == (side == "above")]
        beyond = f"the best learning rate may lie {side} it"
        if past:  # the step past the edge was tried and no seed of it finished
            nearest = min(past) if side == "above" else max(past)
            beyond = (
                f"lr={nearest:g}, {side} it, was tried and did not finish: the best may lie between"
            )
        notes.append(
            f"- **At the edge of the grid:** {_who(row)} lr={row['learning_rate']:g} is the "
            f"grid's {end}: a bound, not an optimum ({beyond})."
        )
    for _, row in chosen[chosen["ties"].map(len) > 0].iterrows():
        others = ", ".join(f"{v:g}" for v in row["ties"])
        notes.append(
            f"- **Tie:** {_who(row)} lr={others} within one standard error of the difference of "
            f"lr={row['learning_rate']:g}'s mean val_acc; the best mean, lr="
            f"{row['learning_rate']:g}, is the choice."
        )
    return notes


def _learning_rate_section(df: pd.DataFrame) -> list[str]:
    """Which learning rate each configuration got (on validation), edges, ties, divergences."""
    if not lr_tuned(df):
        return []
    chosen = chosen_learning_rates(df)
    table = pd.DataFrame(
        {
            "stage": chosen["stage"],
            "method": chosen["method"].replace("", "—"),
            "rank": chosen["rank"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
            "grid": chosen["grid"].map(lambda g: ", ".join(f"{v:g}" for v in g)),
            "chosen lr": chosen["learning_rate"].map(lambda v: f"{v:g}"),
            "val_acc": chosen["val_acc"].map(lambda v: "" if pd.isna(v) else f"{v:.4f}"),
            "tied": chosen["ties"].map(lambda t: ", ".join(f"{v:g}" for v in t)),
            "diverged": chosen["diverged"].map(lambda n: str(n) if n else ""),
        }
    )
    table = table.drop(columns=[c for c in ("tied", "diverged") if table[c].eq("").all()])
    return [
        "## Learning rates",
        "",
        "Each configuration's learning rate is the one with the best mean *validation* accuracy "
        "over seeds; the curves and tables report the *test* accuracy at that learning rate "
        "(`selected` in results.csv). Learning rates tie when their means differ by at most one "
        "standard error of the difference, sqrt(s₁²/n₁ + s₂²/n₂); diverged runs never enter a "
        "mean, and a learning rate with one is chosen only when every learning rate had one.",
        "",
        markdown_table(table),
        *_choice_notes(chosen),
        "",
    ]


def _methods_section(df: pd.DataFrame) -> list[str]:
    """Method × rank, with the winner at each rank and its margin (when methods vary)."""
    compared = method_comparison(tuned_rows(normalize_results(df))[0])
    if compared is None:
        return []
    table, sentences = compared
    pooled = [d for d in varying_lora_dims(normalize_results(df)) if d != "method"]
    note = f" Runs that differ in {' and '.join(pooled)} are pooled." if pooled else ""
    return [
        "## Methods",
        "",
        f"Test metric per method and rank, mean ± sd over seeds.{note}",
        "",
        markdown_table(table),
        *sentences,
        "",
    ]


def _results_section(df: pd.DataFrame) -> list[str]:
    """The per-configuration summary, with every run's row folded away below it."""
    if df.empty:
        return ["## Results", "", "_`results.csv` has no runs yet._", ""]
    return [
        "## Results",
        "",
        "Mean ± sample standard deviation over seeds (finished runs only).",
        "",
        markdown_table(format_summary(summary_table(df))),
        f"<details><summary>All runs ({len(df)})</summary>",
        "",
        markdown_table(format_runs(df)),
        "</details>",
        "",
    ]


def write_report(study_dir: str | Path, tolerance: float | None = None) -> Path:
    """Draw a study's plots and write its ``report.md``, both into the study folder.

    Reads ``results.csv`` and, when present, ``study.json``, each run's
    ``logs/metrics.csv``, ``analysis.csv`` / ``analysis_*.png`` and ``.hydra/config.yaml``.
    Writes ``accuracy_vs_rank.png``, ``accuracy_vs_params.png``, ``curves.png`` and
    ``per_class.png`` (each only when it has something to show; a stale one is removed) and
    ``report.md``, every file atomically. Never trains or evaluates anything.

    Args:
        study_dir: The study folder, or a results table (any ``.csv`` file): the report is
            then written beside it, from that table alone.
        tolerance: The non-inferiority margin; None takes ``report.tolerance`` from the
            folder's ``study.json``, else the default (1 point).

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: If the results table is missing, empty or lacks required columns.
    """
    path = Path(study_dir)
    table = path if path.suffix == ".csv" and not path.is_dir() else path / "results.csv"
    study = table.parent
    df = read_results(table)
    info, notes = read_study_json(study)
    failed = df[~ok_mask(df)]
    diverged = int(diverged_mask(df).sum())
    counts = f"{len(failed) - diverged} failed" + (f", {diverged} diverged" if diverged else "")
    stages = ", ".join(dict.fromkeys(df["stage"]))
    lines = [
        f"# Study report: {study.resolve().name}",
        "",
        f"{len(df)} runs ({counts}); stages: {stages or 'none'}.",
        "",
        *[f"> {note}\n" for note in notes],
    ]
    lines += command_and_environment(info)
    tolerance = study_tolerance(info) if tolerance is None else tolerance
    lines += recommended_section(df, tolerance, study_level(info))
    lines += forgetting_section(df)
    headline = _headline(tuned_rows(df)[0])
    if headline:
        lines += ["## Headline", "", *headline, ""]
    lines += _methods_section(df)
    lines += _learning_rate_section(df)
    lines += _results_section(df)
    if not failed.empty:
        errors = pd.DataFrame(
            {"run_id": failed["run_id"], "stage": failed["stage"],
             "status": failed["status"], "error": failed["error"].map(_short_error)}
        )  # fmt: skip
        lines += ["## Failed runs", "", "Diverged runs are listed too.", "", markdown_table(errors)]
    lines += _draw_plots(study, df)
    lines += analysis_section(study)
    lines += certificate_section(study)
    lines += config_section(study)
    return atomic_write_text(study / REPORT_FILE, "\n".join(lines).rstrip() + "\n")
