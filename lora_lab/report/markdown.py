"""``report.md`` of a study folder: tables, plots and provenance, from results files only."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from lora_lab._atomic import atomic_write_text
from lora_lab.report import plots
from lora_lab.report.curves import metrics_path
from lora_lab.report.labels import format_value, main_metric, varying_lora_dims
from lora_lab.report.lr_heatmap import HEATMAP_FILE, plot_lr_heatmap
from lora_lab.report.selection import (
    ALPHA_LEVEL,
    DEFAULT_TOLERANCE,
    chosen_learning_rates,
    lr_tuned,
    recommend,
    tuned_rows,
)
from lora_lab.report.tables import (
    format_runs,
    format_summary,
    markdown_table,
    method_comparison,
    summary_table,
)
from lora_lab.results import normalize_results, ok_mask, ok_runs, read_results

__all__ = ["summary_table", "write_report"]

logger = logging.getLogger(__name__)

REPORT_FILE = "report.md"
ANALYSIS_ROWS = 30
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
]  # fmt: skip


def _fenced(text: str, language: str = "") -> str:
    """A code block whose fence is longer than any backtick run inside ``text``."""
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{language}\n{text.rstrip()}\n{fence}\n"


def _read_study_json(study: Path) -> tuple[dict, list[str]]:
    """``study.json`` as a dict (``{}`` if absent) and notes about problems reading it."""
    path = study / "study.json"
    if not path.is_file():
        return {}, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        return {}, [f"`study.json` could not be read: {error}"]
    if not isinstance(data, dict):
        return {}, ["`study.json` is not a JSON object; ignored."]
    return data, []


def _environment_rows(environment: dict) -> pd.DataFrame:
    """Flatten the environment record: ``packages`` become one row per package."""

    def text(value: object) -> str:
        if value is None:
            return "n/a"  # e.g. a package that is not installed, or no git checkout
        return value if isinstance(value, str) else json.dumps(value)

    rows: list[tuple[str, str]] = []
    for key, value in environment.items():
        if isinstance(value, dict):
            rows += [(f"{key}: {name}", text(version)) for name, version in value.items()]
        else:
            rows.append((str(key), text(value)))
    return pd.DataFrame(rows, columns=["item", "value"])


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
        means = lora.groupby(keys)[metric].mean()
        rows = lora[keys == (means.idxmax() if metric == "test_acc" else means.idxmin())]
        params = rows["trainable_params"].median()
        share = (
            f" ({100 * params / full_params:.3g}% of full finetune's)" if full_params > 0 else ""
        )
        shown = ("method",) if lora["method"].nunique() > 1 else ()
        config = " ".join(
            format_value(k, rows[k].iloc[0]) for k in (*shown, "rank", "alpha", "learning_rate")
        )
        lines.append(
            f"- Best LoRA ({config}): {name} {stat(rows[metric])}, "
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


def _format_generic(frame: pd.DataFrame) -> pd.DataFrame:
    """Floats to four significant digits; everything else as text."""
    return frame.apply(
        lambda column: (
            column.map(lambda v: "" if pd.isna(v) else format(v, ".4g"))
            if pd.api.types.is_float_dtype(column)
            else column.map(lambda v: "" if pd.isna(v) else str(v))
        )
    )


ANALYSIS_GLOSSARY = [
    "How to read the columns (LoRA paper §7; ΔW is a weight update, W the pretrained weight):",
    "",
    "- **spectrum** rows, one per layer of the full-finetune update ΔW = W_full − W: "
    "`fro_norm` ‖ΔW‖, `relative_update` ‖ΔW‖/‖W‖, `sigma1`, `sigma2` its largest singular "
    "values, `sigma1_over_sigma2` how much one direction dominates, `effective_rank` "
    "exp(entropy of the normalised singular values): 1 for a rank-1 update, the full rank for "
    "a flat spectrum; `rank90`/`rank99` the singular values that hold 90%/99% of ‖ΔW‖².",
    "- **lora_vs_full** rows, one per adapter and layer: `proj_top1` / `proj_top_r` the share "
    "of the full update's energy in the adapter's top-1 / top-r directions (`k_top_r` = r); "
    "1 means LoRA found the full update's subspace. `relative_error` ‖ΔW_lora − ΔW_full‖ / "
    "‖ΔW_full‖, `norm_ratio` ‖ΔW_lora‖/‖ΔW_full‖. `amplification` (§7.3) "
    "‖ΔW_lora‖ / ‖U_rᵀ W V_r‖: how strongly the adapter amplifies directions that W itself "
    "barely uses (large: features W under-emphasises; ~1: directions W already has).",
    "- **subspace** rows, one per pair of adapters and layer: φ(i, j) (§7.2) is the "
    "normalised overlap, in [0, 1], of the top-i right singular directions of one adapter's A "
    "with the top-j of the other's: `phi_top1` φ(1,1), `phi_full` φ(m,m) for the whole smaller "
    "subspace (m = `grid_size`), `phi_mean` the grid's mean. 1: the same subspace; near 0: "
    "unrelated directions.",
]


def _analysis_section(study: Path) -> list[str]:
    """Figures and table written by ``lora_lab.analysis``, when present."""
    images = sorted(study.glob("analysis_*.png"))
    table_path = study / "analysis.csv"
    if not images and not table_path.is_file():
        return []
    lines = ["## Analysis", ""]
    for image in images:
        title = image.stem.removeprefix("analysis_").replace("_", " ")
        lines += [f"### {title}", "", f"![{title}]({image.name})", ""]
    if table_path.is_file():
        try:
            table = pd.read_csv(table_path)
        except (OSError, ValueError) as error:
            return [*lines, f"_`analysis.csv` could not be read: {error}_", ""]
        lines += ["### analysis.csv", "", *ANALYSIS_GLOSSARY, ""]
        if "kind" in table.columns:
            # One sub-table per kind, each with only the columns that kind fills in.
            for kind, group in table.groupby("kind", sort=False):
                group = group.drop(columns="kind").dropna(axis=1, how="all")
                lines += [f"#### {kind}", "", markdown_table(_format_generic(group), ANALYSIS_ROWS)]
        else:
            lines.append(markdown_table(_format_generic(table), ANALYSIS_ROWS))
    return lines


def _config_section(study: Path) -> list[str]:
    """The resolved Hydra config, verbatim, folded away."""
    path = study / ".hydra" / "config.yaml"
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8")
    return [
        "## Resolved config",
        "",
        "<details><summary><code>.hydra/config.yaml</code></summary>",
        "",
        _fenced(text, "yaml"),
        "</details>",
        "",
    ]


def study_tolerance(info: dict) -> float:
    """`report.tolerance` of the study's config (study.json), else the default (1 point)."""
    config = info.get("config") if isinstance(info.get("config"), dict) else {}
    value = (config.get("report") or {}).get("tolerance")
    return float(value) if isinstance(value, (int, float)) else DEFAULT_TOLERANCE


def _recommended_section(df: pd.DataFrame, tolerance: float) -> list[str]:
    """The answer first: the recommended rank per method, or why there is none."""
    recommendations = recommend(df, tolerance)
    if not recommendations:
        return []
    lines = ["## Recommended rank", ""]
    lines += [f"- {r.sentence(tolerance)}." for r in recommendations]
    lines += [
        "",
        f"The smallest rank whose tuned test accuracy is within {100 * tolerance:g} point(s) of "
        "the tuned full finetune and, with ≥ 3 seeds on both sides, not significantly below it "
        f"(one-sided Welch t-test, p ≥ {ALPHA_LEVEL}). `report.tolerance` sets the tolerance.",
        "",
    ]
    return lines


def _learning_rate_section(df: pd.DataFrame) -> list[str]:
    """Which learning rate each configuration got (on validation), and grid-edge warnings."""
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
        }
    )
    warnings = []
    for _, row in chosen[chosen["at_edge"]].iterrows():
        who = (
            "the full finetune's"
            if pd.isna(row["rank"])
            else f"{row['stage']} {row['method']} r={row['rank']:g}:"
        )
        end = "smallest" if row["learning_rate"] == row["grid"][0] else "largest"
        warnings.append(
            f"- **At the edge of the grid:** {who} lr={row['learning_rate']:g} is the grid's "
            f"{end}; the best learning rate may lie outside it."
        )
    return [
        "## Learning rates",
        "",
        "Each configuration's learning rate is the one with the best mean *validation* accuracy "
        "over seeds; the curves and tables report the *test* accuracy at that learning rate "
        "(`selected` in results.csv).",
        "",
        markdown_table(table),
        *warnings,
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


def write_report(study_dir: str | Path) -> Path:
    """Draw a study's plots and write its ``report.md``, both into the study folder.

    Reads ``results.csv`` and, when present, ``study.json``, each run's
    ``logs/metrics.csv``, ``analysis.csv`` / ``analysis_*.png`` and ``.hydra/config.yaml``.
    Writes ``accuracy_vs_rank.png``, ``accuracy_vs_params.png``, ``curves.png`` and
    ``per_class.png`` (each only when it has something to show; a stale one is removed) and
    ``report.md``, every file atomically. Never trains or evaluates anything.

    Args:
        study_dir: The study folder.

    Returns:
        The path of ``report.md``.

    Raises:
        ValueError: If ``results.csv`` is missing, empty or lacks required columns.
    """
    study = Path(study_dir)
    df = read_results(study / "results.csv")
    info, notes = _read_study_json(study)
    failed = df[~ok_mask(df)]
    stages = ", ".join(dict.fromkeys(df["stage"]))
    lines = [
        f"# Study report: {study.resolve().name}",
        "",
        f"{len(df)} runs ({len(failed)} failed); stages: {stages or 'none'}.",
        "",
        *[f"> {note}\n" for note in notes],
    ]
    command = info.get("command")
    if command:
        text = " ".join(map(str, command)) if isinstance(command, list) else str(command)
        lines += ["## Command", "", _fenced(text, "bash")]
    if isinstance(info.get("environment"), dict) and info["environment"]:
        lines += ["## Environment", "", markdown_table(_environment_rows(info["environment"]))]
    lines += _recommended_section(df, study_tolerance(info))
    headline = _headline(tuned_rows(df)[0])
    if headline:
        lines += ["## Headline", "", *headline, ""]
    lines += _methods_section(df)
    lines += _learning_rate_section(df)
    lines += _results_section(df)
    if not failed.empty:
        errors = pd.DataFrame(
            {"run_id": failed["run_id"], "stage": failed["stage"],
             "error": failed["error"].map(_short_error)}
        )  # fmt: skip
        lines += ["## Failed runs", "", markdown_table(errors)]
    lines += _draw_plots(study, df)
    lines += _analysis_section(study)
    lines += _config_section(study)
    return atomic_write_text(study / REPORT_FILE, "\n".join(lines).rstrip() + "\n")
