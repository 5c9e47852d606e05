"""Learning rates chosen on validation data, and the rank a study recommends.

A study that sweeps learning rates (`sweep.learning_rates`, `stages.full_finetune.learning_rates`)
gives each configuration (stage, method, rank, α) the learning rate with the best mean
*validation* accuracy over seeds; the tuned curve reports the *test* accuracy at that learning
rate. Test data never takes part in the choice.

The recommended rank (per method) is the smallest rank whose tuned test accuracy is not
significantly below the tuned full finetune: with ≥ 3 seeds on both sides, a one-sided Welch
t-test (scipy) gives p ≥ 0.05 *and* the mean is within the tolerance; with fewer seeds, the
mean within the tolerance (no test is possible, and the report says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lora_lab.results import ok_mask

#: What a learning rate is chosen within: one curve point (seeds and learning rates vary).
CONFIG_KEYS = ["stage", "method", "rank", "alpha"]
ALPHA_LEVEL = 0.05
DEFAULT_TOLERANCE = 0.01  # one accuracy point


def _keys(df: pd.DataFrame) -> pd.DataFrame:
    """The configuration keys as strings, so that NaN (no rank on full-finetune rows) groups."""
    return df[CONFIG_KEYS].map(str)  # (astype(str) keeps NaN as missing in pandas 3)


def chosen_learning_rates(df: pd.DataFrame) -> pd.DataFrame:
    """Per configuration: the grid of learning rates, the chosen one and its mean val_acc.

    Args:
        df: A normalized results table.

    Returns:
        Columns ``stage, method, rank, alpha, learning_rate, val_acc, grid, at_edge``; a
        configuration without validation accuracy (regression) keeps its only, or first,
        learning rate. ``at_edge`` is True when the choice is the grid's smallest or largest
        value of a grid of three or more (the best may lie outside it).
    """
    done = df[ok_mask(df) & df["stage"].isin(["full_finetune", "lora"])]
    rows = []
    keys = _keys(done)
    for _key, group in done.groupby([keys[c] for c in CONFIG_KEYS], sort=False):
        grid = sorted(group["learning_rate"].dropna().unique())
        means = group.groupby("learning_rate")["val_acc"].mean().dropna()
        chosen = means.idxmax() if len(means) else (grid[0] if grid else math.nan)
        first = group.iloc[0]
        rows.append(
            {
                **{key: first[key] for key in CONFIG_KEYS},
                "learning_rate": chosen,
                "val_acc": means.get(chosen, math.nan),
                "grid": grid,
                "at_edge": len(grid) >= 3 and chosen in (grid[0], grid[-1]),
            }
        )
    columns = [*CONFIG_KEYS, "learning_rate", "val_acc", "grid", "at_edge"]
    return pd.DataFrame(rows, columns=columns)


def selected_mask(df: pd.DataFrame) -> pd.Series:
    """The rows the tuned curve uses: every pretrain row, and for each configuration the
    finished rows at its chosen learning rate (see `chosen_learning_rates`)."""
    chosen = chosen_learning_rates(df)
    picked = set(
        zip(*[chosen[c].map(str) for c in CONFIG_KEYS], chosen["learning_rate"], strict=True)
    )
    keys = zip(*[_keys(df)[c] for c in CONFIG_KEYS], df["learning_rate"], strict=True)
    in_choice = pd.Series([key in picked for key in keys], index=df.index)
    return (df["stage"] == "pretrain") | (ok_mask(df) & in_choice)


def lr_tuned(df: pd.DataFrame) -> bool:
    """Whether some configuration ran at several learning rates with validation accuracy to
    choose by (tables from before `val_acc` show every learning rate, as they did)."""
    done = df[ok_mask(df) & df["stage"].isin(["full_finetune", "lora"])]
    done = done.dropna(subset=["val_acc"])
    if done.empty:
        return False
    keys = _keys(done)
    return bool(done.groupby([keys[c] for c in CONFIG_KEYS])["learning_rate"].nunique().max() > 1)


def tuned_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, bool]:
    """The rows the curves and tables show: each configuration at its chosen learning rate
    when learning rates were swept (and True), else every row (and False)."""
    if not lr_tuned(df):
        return df, False
    return df[selected_mask(df)], True


def _welch_less(lora: np.ndarray, full: np.ndarray) -> float | None:
    """p of the one-sided Welch t-test "LoRA's mean is below the full finetune's", or None
    with fewer than 3 seeds on either side."""
    if len(lora) < 3 or len(full) < 3:
        return None
    return float(stats.ttest_ind(lora, full, equal_var=False, alternative="less").pvalue)


@dataclass(frozen=True)
class Recommendation:
    """The recommended rank of one method, or why there is none.

    Attributes:
        method: The LoRA method.
        rank: The recommended rank; None when no rank qualifies.
        mean: Its tuned mean test accuracy (the best rank's when none qualifies).
        full_mean: The tuned full finetune's mean test accuracy.
        p_value: The one-sided Welch test's p (None when it could not be run).
        params: Its trainable parameters; full_params: the full finetune's.
        seeds: The seeds on the LoRA side and on the full-finetune side.
        best_rank: The rank with the best mean (for the "no rank qualifies" message).
    """

    method: str
    rank: int | None
    mean: float
    full_mean: float
    p_value: float | None
    params: float
    full_params: float
    seeds: tuple[int, int]
    best_rank: int

    def sentence(self, tolerance: float) -> str:
        """One line for the terminal and the top of report.md."""
        who = "" if self.method in ("", "default") else f" ({self.method})"
        if self.rank is None:
            gap = 100 * (self.full_mean - self.mean)
            test = f", Welch p={self.p_value:.3g}" if self.p_value is not None else ""
            return (
                f"recommended rank{who}: none; no rank is both within {100 * tolerance:g} "
                f"point(s) of the full finetune ({self.full_mean:.4f}) and not significantly "
                f"below it: the best, r={self.best_rank}, reaches {self.mean:.4f}, {gap:.2f} "
                f"points below{test}"
            )
        share = 100 * self.params / self.full_params if self.full_params else math.nan
        test = (
            f"one-sided Welch p={self.p_value:.3g}"
            if self.p_value is not None
            else f"no t-test with {min(self.seeds)} seed(s): within {100 * tolerance:g} point(s)"
        )
        return (
            f"recommended rank{who}: r={self.rank}: test accuracy {self.mean:.4f} against "
            f"{self.full_mean:.4f} for the full finetune ({test}), with {self.params:,.0f} "
            f"trainable parameters, {share:.3g}% of the full finetune's {self.full_params:,.0f}"
        )


def recommend(df: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE) -> list[Recommendation]:
    """The recommended rank of each method (see the module docstring), from the tuned rows.

    Args:
        df: A normalized results table (with `selected`, or it is computed here).
        tolerance: How far below the tuned full finetune's mean a rank may stay (0.01 = 1 point).

    Returns:
        One recommendation per method; [] for a study without accuracy or without a finished
        full finetune.
    """
    if "test_acc" not in df or df["test_acc"].isna().all():
        return []
    tuned = df[selected_mask(df)]
    full = tuned[tuned["stage"] == "full_finetune"]["test_acc"].dropna()
    if full.empty:
        return []
    full_params = float(tuned[tuned["stage"] == "full_finetune"]["trainable_params"].median())
    out = []
    lora = tuned[tuned["stage"] == "lora"].dropna(subset=["rank", "test_acc"])
    for method, runs in lora.groupby("method", sort=False):
        by_rank = runs.groupby("rank")
        best_rank = by_rank["test_acc"].mean().idxmax()
        found = None
        for rank, group in sorted(by_rank, key=lambda item: item[0]):
            values = group["test_acc"].to_numpy()
            close = full.mean() - values.mean() <= tolerance
            p_value = _welch_less(values, full.to_numpy())
            if p_value is not None:
                close = close and p_value >= ALPHA_LEVEL
            if close:
                found = (int(rank), group, p_value)
                break
        if found is None:  # the best rank's own test, for the message
            best = by_rank.get_group(best_rank)
            found = (None, best, _welch_less(best["test_acc"].to_numpy(), full.to_numpy()))
        rank, group, p_value = found
        out.append(
            Recommendation(
                method=str(method),
                rank=rank,
                mean=float(group["test_acc"].mean()),
                full_mean=float(full.mean()),
                p_value=p_value,
                params=float(group["trainable_params"].median()),
                full_params=full_params,
                seeds=(len(group), len(full)),
                best_rank=int(best_rank),
            )
        )
    return out
