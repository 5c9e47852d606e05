"""Training and validation curves of every finished run, read from its Lightning CSV log."""

from __future__ import annotations

import logging
import sys

import matplotlib

# Same rule as plots.py: headless unless the caller already chose a pyplot backend.
if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")

from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lora_lab._atomic import atomic_write_text
from lora_lab.plotting import (
    FULL_FINETUNE_COLOR,
    PRETRAIN_COLOR,
    new_figure,
    save_figure,
    sequential_colors,
    theme,
)
from lora_lab.report.figures import figure_legend, method_colors
from lora_lab.report.labels import config_label, varying_lora_dims
from lora_lab.report.selection import selected_mask, tuned_rows
from lora_lab.results import normalize_results, ok_runs, sort_by_stage

logger = logging.getLogger(__name__)

METRICS_FILE = Path("logs") / "metrics.csv"
SPLITS = {"train": "train", "val": "validation"}
QUANTITIES = {"loss": "loss", "acc": "accuracy"}
CURVE_COLUMNS = ["run_id", "config", "seed", "epoch", "split", "quantity", "value"]
#: The study's committed per-epoch curves of its finetune runs (`study_curves`).
CURVES_FILE = "curves.csv"
IDENTITY_COLUMNS = ["run_id", "stage", "method", "rank", "alpha", "learning_rate", "seed"]
VALUE_COLUMNS = ["train_loss", "train_acc", "val_loss", "val_acc"]
CURVES_FILE_COLUMNS = [*IDENTITY_COLUMNS, "selected", "epoch", *VALUE_COLUMNS]


def metrics_path(study_dir: str | Path, run_dir: str) -> Path | None:
    """Where a run's CSVLogger output lives, or ``None`` if the row has no ``run_dir``."""
    return Path(study_dir) / run_dir / METRICS_FILE if run_dir else None


def _epoch_series(log: pd.DataFrame, name: str) -> pd.Series | None:
    """One value per epoch of a logged metric: its last value logged in that epoch.

    Lightning names an epoch-aggregated metric ``name`` or, when it is also logged per step,
    ``name_epoch``; rows are sparse (NaN where that metric was not logged at that step).
    """
    for column in (name, f"{name}_epoch"):
        if column in log.columns and "epoch" in log.columns:
            values = log[["epoch", column]].dropna()
            if not values.empty:
                return values.groupby("epoch")[column].last()
    return None


def collect_curves(
    study_dir: str | Path, df: pd.DataFrame, dims: list[str] | None = None
) -> tuple[pd.DataFrame, list[str]]:
    """Gather every finished run's per-epoch metrics into one long table.

    Args:
        study_dir: The study folder (``run_dir`` entries are relative to it).
        df: The results table; failed runs are skipped.
        dims: The LoRA settings a `config` label names (default: those that vary in `df`).

    Returns:
        ``(curves, missing)``: ``curves`` has columns ``CURVE_COLUMNS`` (``split`` is
        "train"/"validation", ``quantity`` "loss"/"accuracy"); ``missing`` lists the run ids
        whose ``metrics.csv`` is absent or unreadable.
    """
    df = normalize_results(df)
    dims = varying_lora_dims(df) if dims is None else dims
    frames: list[pd.DataFrame] = []
    missing: list[str] = []
    for _, row in ok_runs(df).iterrows():
        path = metrics_path(study_dir, row["run_dir"])
        try:
            log = pd.read_csv(path) if path is not None and path.is_file() else None
        except (OSError, ValueError) as error:  # a truncated or garbled log is not fatal
            logger.warning("run %s: cannot read %s: %s", row["run_id"], path, error)
            log = None
        if log is None:
            missing.append(row["run_id"])
            continue
        for split, split_name in SPLITS.items():
            for quantity, quantity_name in QUANTITIES.items():
                series = _epoch_series(log, f"{split}_{quantity}")
                if series is None:
                    continue
                frames.append(
                    pd.DataFrame(
                        {
                            "run_id": row["run_id"],
                            "config": config_label(row, dims),
                            "seed": row["seed"],
                            "epoch": series.index.astype(float),
                            "split": split_name,
                            "quantity": quantity_name,
                            "value": series.to_numpy(dtype=float),
                        }
                    )
                )
    curves = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CURVE_COLUMNS)
    return curves, missing


def _palette(configs: list[str], methods: dict[str, str] | None = None) -> dict[str, object]:
    """Fixed colours for pretrain/full finetune; LoRA configurations coloured in rank order,
    or, with `methods` (configuration → method, when methods vary), one hue per method in
    shades by rank (lighter: smaller rank)."""
    lora = [c for c in configs if c.startswith("LoRA")]
    colors: dict[str, object] = dict(zip(lora, sequential_colors(lora), strict=False))
    if methods:
        names = sorted(set(methods.values()), key=lambda m: (m != "default", m))
        for method, base in zip(names, method_colors(len(names)), strict=True):
            own = [c for c in lora if methods.get(c) == method]
            shades = sns.light_palette(base, n_colors=len(own) + 2)[2:]
            colors.update(zip(own, shades, strict=True))
    colors.update({"pretrain": PRETRAIN_COLOR, "full finetune": FULL_FINETUNE_COLOR})
    return {c: colors[c] for c in configs}


def _methods_by_config(df: pd.DataFrame, dims: list[str]) -> dict[str, str]:
    """LoRA configuration label → its method, for the finished LoRA runs."""
    lora = ok_runs(df, "lora")
    return dict(zip(lora.apply(lambda row: config_label(row, dims), axis=1), lora["method"],
                    strict=True))  # fmt: skip


def _method_legend(ax, palette: dict[str, object], methods: dict[str, str]) -> None:
    """Legend entries per stage and per method (its darkest shade), on empty proxy lines."""
    entries = {c: palette[c] for c in palette if c in ("pretrain", "full finetune")}
    order = sorted(set(methods.values()), key=lambda m: (m != "default", m))
    for config, method in sorted(methods.items(), key=lambda item: order.index(item[1])):
        entries[f"LoRA {method} (lighter: smaller rank)"] = palette[config]  # the last: darkest
    for label, color in entries.items():
        ax.plot([], [], color=color, marker="o", markersize=4, label=label)


def _missing_note(missing: list[str], shown: int = 6) -> str:
    """Which runs have no log, e.g. "...: a, b, c and 4 more (skipped)." (one short line)."""
    names = ", ".join(missing[:shown])
    more = f" and {len(missing) - shown} more" if len(missing) > shown else ""
    return f"No logs/metrics.csv for run(s): {names}{more} (skipped)."


def draw_curves(study_dir: str | Path, df: pd.DataFrame) -> Figure | None:
    """Grid of curves: columns loss/accuracy, rows train/validation; see :func:`plot_curves`."""
    # With a learning-rate grid, only each configuration at its chosen learning rate: a line
    # per grid point (21 configurations × 3 seeds in the default study) cannot be told apart.
    df, tuned = tuned_rows(normalize_results(df))
    # Labels without the learning rate when it was tuned: methods may choose different ones.
    dims = varying_lora_dims(df, tuned)
    curves, missing = collect_curves(study_dir, df, dims)
    if curves.empty:
        return None
    # Configurations in study order (pretrain, full finetune, then LoRA by rank) for the legend.
    ordered = sort_by_stage(ok_runs(df)).apply(lambda row: config_label(row, dims), axis=1)
    configs = [c for c in dict.fromkeys(ordered) if c in set(curves["config"])]
    methods = _methods_by_config(df, dims) if "method" in dims else {}
    palette = _palette(configs, methods)
    quantities = [q for q in QUANTITIES.values() if q in set(curves["quantity"])]
    splits = [s for s in SPLITS.values() if s in set(curves["split"])]
    several_seeds = curves.groupby("config")["run_id"].nunique().max() > 1
    with theme():
        fig, axes = new_figure(
            4.4 * len(quantities) + 2.2, 3.2 * len(splits) + 0.6,
            nrows=len(splits), ncols=len(quantities), sharex=True, sharey="col",
        )  # fmt: skip
        for i, split in enumerate(splits):
            for j, quantity in enumerate(quantities):
                ax = axes[i][j]
                data = curves[(curves["split"] == split) & (curves["quantity"] == quantity)]
                if data.empty:
                    ax.text(0.5, 0.5, "not logged", ha="center", va="center",
                            transform=ax.transAxes, color="0.5")  # fmt: skip
                else:
                    # units + estimator=None: one line per seed, seeds of a config share a colour.
                    sns.lineplot(
                        data, x="epoch", y="value", hue="config", hue_order=configs,
                        palette=palette, units="run_id", estimator=None, marker="o",
                        markersize=4, linewidth=1.4, ax=ax, legend=not methods,
                    )  # fmt: skip
                ax.set_title(f"{split} {quantity}")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
                ax.set_xlabel("epoch" if i == len(splits) - 1 else "")
                ax.set_ylabel(quantity)
        losses = curves.loc[curves["quantity"] == "loss", "value"]
        if not losses.empty and (losses > 0).all() and losses.max() / losses.min() > 20:
            # Losses spanning decades read better on a log axis (the loss column is first).
            for ax in axes[:, 0]:
                ax.set_yscale("log")
        seeds = " (one line per seed)" if several_seeds else " (one seed: no spread)"
        title = "Training and validation curves" + seeds
        title += ", each at its chosen learning rate" if tuned else ""
        if "pretrain" in configs:
            title += "\npretrain curves are measured on the pretraining (source) task"
        fig.suptitle(title)
        if methods:  # one legend entry per method, not one per method and rank
            _method_legend(axes[0][0], palette, {c: methods[c] for c in configs if c in methods})
        figure_legend(fig, list(axes.flat), note=_missing_note(missing) if missing else None)
    return fig


def plot_curves(study_dir: str | Path, df: pd.DataFrame, path: str | Path) -> Path | None:
    """Training and validation loss/accuracy per epoch for every finished run.

    Reads ``<study_dir>/<run_dir>/logs/metrics.csv`` of each run; runs without one are skipped
    and named in a note above the legend. Accuracy columns are absent for regression studies.

    Args:
        study_dir: The study folder.
        df: The results table (failed rows are ignored).
        path: PNG to write.

    Returns:
        ``path``, or ``None`` when no run has a readable log.
    """
    with theme():
        fig = draw_curves(study_dir, df)
        return None if fig is None else save_figure(fig, path)


def curves_file_table(study_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """Every finished finetune run's curves, one row per run and epoch (`CURVES_FILE_COLUMNS`).

    `epoch` is Lightning's 0-based epoch index: each value is the one logged at the end of
    that epoch. `selected` marks the runs at their configuration's chosen learning rate.
    """
    df = normalize_results(df)
    finetune = df[df["stage"].isin(["full_finetune", "lora"])]
    finetune = finetune.assign(selected=selected_mask(df)[finetune.index])
    long, _missing = collect_curves(study_dir, finetune)
    if long.empty:
        return pd.DataFrame(columns=CURVES_FILE_COLUMNS)
    long = long.assign(name=long["split"].map({v: k for k, v in SPLITS.items()}) + "_"
                       + long["quantity"].map({v: k for k, v in QUANTITIES.items()}))  # fmt: skip
    wide = long.pivot_table(index=["run_id", "epoch"], columns="name", values="value")
    wide = wide.reset_index().merge(finetune[[*IDENTITY_COLUMNS, "selected"]], on="run_id")
    wide = wide.reindex(columns=CURVES_FILE_COLUMNS)
    return sort_by_stage(wide, then=("method", "epoch"))


def study_curves(study_dir: str | Path, df: pd.DataFrame) -> pd.DataFrame:
    """The study's per-epoch curves: gathered from the runs' logs and written to
    `<study>/curves.csv`; where no run has a log (a committed study folder holds no logs),
    the `curves.csv` already there, unchanged. Empty when there is neither."""
    study = Path(study_dir)
    table = curves_file_table(study, df)
    target = study / CURVES_FILE
    if not table.empty:
        atomic_write_text(target, table.to_csv(index=False, float_format="%.6g"))
        return table
    if target.is_file():
        return pd.read_csv(target, dtype={"run_id": str, "stage": str, "method": str})
    return table
