"""Learning rates chosen on validation data (the recommended rank is `report.verdict`'s).

A study that sweeps learning rates (`sweep.learning_rates`, `stages.full_finetune.learning_rates`)
gives each configuration (stage, method, rank, α) the learning rate with the best mean
*validation* accuracy over its finished seeds; the tuned curve reports the *test* accuracy at
that learning rate. Test data never takes part in the choice. A learning rate at which some
seed diverged (status `diverged`) is chosen only when every learning rate of the configuration
had a divergence: its surviving seeds' mean would flatter it.

Two learning rates *tie* when their mean validation accuracies differ by at most one standard
error of the difference, sqrt(s₁²/n₁ + s₂²/n₂) over seeds (sample variances; with one seed on
either side no tie can be told). The best mean is still the choice; the report names the ties.
"""

from __future__ import annotations

import math

import pandas as pd

from lora_lab.results import diverged_mask, ok_mask

#: The smallest grid whose end choice is a bound: two values bracket nothing (the pipeline
#: extends such a choice's grid past its edge, `sweep.lr_extend`).
EDGE_GRID = 2
#: What a learning rate is chosen within: one curve point (seeds and learning rates vary).
CONFIG_KEYS = ["stage", "method", "rank", "alpha"]


def config_keys(df: pd.DataFrame) -> pd.DataFrame:
    """The configuration keys as strings, so that NaN (no rank on full-finetune rows) groups."""
    return df[CONFIG_KEYS].map(str)  # (astype(str) keeps NaN as missing in pandas 3)


def _tied_with(chosen: float, values: pd.DataFrame) -> list[float]:
    """The learning rates whose mean val_acc is within one standard error of the difference
    from the chosen one's (`values`: one row per finished run, `learning_rate` and `val_acc`)."""
    stats = values.groupby("learning_rate")["val_acc"].agg(["mean", "var", "count"])
    if chosen not in stats.index:
        return []
    best = stats.loc[chosen]
    tied = []
    for learning_rate, row in stats.drop(index=chosen).iterrows():
        if min(row["count"], best["count"]) < 2:
            continue  # no spread to compare with
        error = math.sqrt(best["var"] / best["count"] + row["var"] / row["count"])
        if best["mean"] - row["mean"] <= error:
            tied.append(float(learning_rate))
    return sorted(tied)


def _choose(group: pd.DataFrame) -> dict[str, object]:
    """One configuration's choice from all its rows (every status)."""
    done = group[ok_mask(group)]
    grid = sorted(done["learning_rate"].dropna().unique())
    diverged = group[diverged_mask(group)]
    clean = done[~done["learning_rate"].isin(diverged["learning_rate"])]
    pool = clean if clean["val_acc"].notna().any() else done
    means = pool.groupby("learning_rate")["val_acc"].mean().dropna()
    chosen = means.idxmax() if len(means) else (grid[0] if grid else math.nan)
    return {
        "learning_rate": chosen,
        "val_acc": means.get(chosen, math.nan),
        "grid": grid,
        # without validation accuracy (regression) nothing was chosen: no edge to step past
        "at_edge": len(means) > 0 and len(grid) >= EDGE_GRID and chosen in (grid[0], grid[-1]),
        "ties": _tied_with(chosen, pool.dropna(subset=["val_acc"])),
        "diverged": len(diverged),
        # tried, but no seed finished: a step past an edge that diverged, say
        "failed_lrs": sorted(set(group["learning_rate"].dropna()) - set(grid)),
    }


def chosen_learning_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: the grid of learning rates, the chosen one and its mean val_acc.

    Args:
        df: A normalized results table.

    Returns:
        Columns ``stage, method, rank, alpha, learning_rate, val_acc, grid, at_edge, ties,
        diverged``; a configuration without validation accuracy (regression) keeps its only,
        or first, learning rate. ``at_edge`` is True when the choice is the grid's smallest or
        largest value of a grid of two or more (`EDGE_GRID`): a bound, not an optimum (the best may lie
        outside the grid). ``ties`` lists the learning rates tied with the choice (see the
        module docstring), ``diverged`` counts the configuration's diverged runs.
    """
    trained = df[df["stage"].isin(["full_finetune", "lora"])]
    live = trained[ok_mask(trained) | diverged_mask(trained)]
    rows = []
    keys = config_keys(live)
    for _key, group in live.groupby([keys[c] for c in CONFIG_KEYS], sort=False):
        if not ok_mask(group).any():
            continue  # every run diverged: nothing to choose
        first = group.iloc[0]
        rows.append({**{key: first[key] for key in CONFIG_KEYS}, **_choose(group)})
    columns = [*CONFIG_KEYS, "learning_rate", "val_acc", "grid", "at_edge", "ties", "diverged"]
    columns.append("failed_lrs")
    return pd.DataFrame(rows, columns=columns)


def selected_mask(df: pd.DataFrame) -> pd.Series:
    """The rows the tuned curve uses: every pretrain row, and for each configuration the
    finished rows at its chosen learning rate (see `chosen_learning_rates`)."""
    chosen = chosen_learning_rates(df)
    picked = set(
        zip(*[chosen[c].map(str) for c in CONFIG_KEYS], chosen["learning_rate"], strict=True)
    )
    keys = zip(*[config_keys(df)[c] for c in CONFIG_KEYS], df["learning_rate"], strict=True)
    in_choice = pd.Series([key in picked for key in keys], index=df.index)
    return (df["stage"] == "pretrain") | (ok_mask(df) & in_choice)


def lr_tuned(df: pd.DataFrame) -> bool:
    """Whether some configuration ran at several learning rates with validation accuracy to
    choose by (tables from before `val_acc` show every learning rate, as they did)."""
    done = df[ok_mask(df) & df["stage"].isin(["full_finetune", "lora"])]
    done = done.dropna(subset=["val_acc"])
    if done.empty:
        return False
    keys = config_keys(done)
    return bool(done.groupby([keys[c] for c in CONFIG_KEYS])["learning_rate"].nunique().max() > 1)


def tuned_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The rows the curves and tables show: each configuration at its chosen learning rate
    when learning rates were swept (and True), else every row (and False)."""
    if not lr_tuned(df):
        return df, False
    return df[selected_mask(df)], True
