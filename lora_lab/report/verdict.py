"""The rank a study recommends: non-inferiority to the full finetune, tested largest rank first.

For each method and rank, at its chosen learning rate (the `selected` rows), the *gap* is
mean(full finetune test_acc) − mean(LoRA test_acc). Its one-sided 95% upper confidence bound is
Welch's: gap + t(0.95, ν)·se, with se = sqrt(s_f²/n_f + s_l²/n_l) (sample variances) and ν the
Welch–Satterthwaite degrees of freedom (`scipy.stats.t` gives the quantile); the two-sided 95%
interval is gap ± t(0.975, ν)·se. A rank is *non-inferior* when the upper bound is below
`report.tolerance`. The ranks whose adapters train fewer parameters than the full finetune are
tested as a fixed sequence from the largest down, stopping at the first that fails or has
fewer than 3 seeds on either side; the recommended rank is the last that passed. A fixed
sequence keeps the family-wise error at 5% with no multiplicity correction. A rank with as many
trainable parameters as the full finetune, or more, saves nothing: it is shown, never tested.

A study that tests classes it does not finetune on is judged on fit, the test accuracy on the
finetune classes (`report.forgetting`). With no rank recommended, a largest rank that is full
rank in every adapted layer (`full_rank_at`) and not non-inferior shows the gap is no rank limit.

Collapsed seeds (identical values, zero variance) are handled by hand, where scipy's t-test
would warn and return NaN: with no spread on either side the bound is the gap itself; with
spread on one side only, ν = n − 1 of that side (Welch–Satterthwaite's limit).

Settled: a tested rank's answer is *settled* when its one-sided 95% interval clears the
tolerance on one side: the upper bound below it (a settled pass) or the lower bound,
gap − t(0.95, ν)·se, above it (a settled fail), with ≥ 3 seeds a side. A recommendation is
settled when every rank of the sequence, largest first, up to and including the first settled
fail, is settled (`sweep.seeds=auto` adds seeds until it is).

With `sweep.seeds=auto` the study looks at the verdict after every seed it adds, from 3 seeds
up to `report.max_seeds`, and stops at the first answer: testing each look at 95% would let a
rank whose true gap is at the tolerance pass about 13% of the time (simulated, 3 → 10 seeds),
not 5%. An auto study therefore tests every look at 1 − 0.05/L, with L = max_seeds − 2 looks
(Bonferroni over the looks, `study_confidence`), so the chance that any look passes such a
rank stays at most 5%; its report names the level.

Seeds needed: with n seeds on each side and the observed spreads s_f, s_l, the bound of the
observed gap g is g + t(0.95, ν_n)·sqrt((s_f² + s_l²)/n), ν_n = (n − 1)(s_f² + s_l²)²/(s_f⁴ + s_l⁴).
The estimate is the smallest n ≥ 3 at which that falls below the tolerance (a side with one
seed borrows the other's spread); when g ≥ tolerance no number of seeds can clear it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
from scipy import stats

from lora_lab.report.forgetting import class_split, fit_accuracy
from lora_lab.report.selection import selected_mask

DEFAULT_TOLERANCE = 0.01  # one accuracy point
CONFIDENCE = 0.95
MIN_SEEDS = 3
DEFAULT_MAX_SEEDS = 10  # report.max_seeds
MAX_SEEDS_ESTIMATE = 1000  # past this, "more than 1000" says enough

#: Whether a tested rank's answer is settled (see the module docstring).
SETTLED_PASS, SETTLED_FAIL, UNSETTLED = "settled pass", "settled fail", "unsettled"

#: Verdicts of one rank, as the report's table shows them.
PASS, FAIL, FEW_SEEDS = "pass", "fail", "too few seeds"
NOT_TESTED, NO_SAVING = "not tested", "no saving"


@dataclass(frozen=True)
class Gap:
    """The full finetune's mean test accuracy minus a rank's, with its Welch intervals.

    Attributes:
        gap: mean(full) − mean(LoRA), accuracy as a fraction (0.01 = 1 point).
        upper: One-sided 95% upper bound of the gap (NaN when a side has one seed only).
        low, high: Two-sided 95% interval (NaN likewise).
        df: Welch–Satterthwaite degrees of freedom (inf with no spread on either side).
    """

    gap: float
    upper: float
    low: float
    high: float
    df: float

    @property
    def lower(self) -> float:
        """The one-sided 95% lower bound, gap − t(0.95, ν)·se (the mirror of `upper`)."""
        return 2 * self.gap - self.upper


def _variance(values: np.ndarray) -> float:
    """Sample variance (ddof=1); exactly 0 for identical values, where float rounding of the
    mean would leave ~1e-32 and a spurious spread (scipy's "precision loss" case)."""
    return 0.0 if np.ptp(values) == 0 else float(np.var(values, ddof=1))


def study_confidence(auto_seeds: bool, max_seeds: int) -> float:
    """The one-sided confidence of each test: 95%, or with `sweep.seeds=auto` 95% split over
    its looks at 3, 4, …, `max_seeds` seeds (see the module docstring)."""
    looks = max(1, max_seeds - MIN_SEEDS + 1)
    return 1 - (1 - CONFIDENCE) / looks if auto_seeds else CONFIDENCE


def level(confidence: float) -> str:
    """A confidence as the report writes it: 0.95 → "95%", 0.99375 → "99.38%"."""
    return f"{100 * confidence:.4g}%"


def welch_gap(full: np.ndarray, lora: np.ndarray, confidence: float = CONFIDENCE) -> Gap:
    """The gap mean(full) − mean(lora) with its one-sided `confidence` Welch bounds and the
    two-sided interval at the same level (95%, 95%-two-sided by default).

    Args:
        full: Test accuracies of the full finetune, one per seed, shape [n_f].
        lora: Test accuracies of one rank, one per seed, shape [n_l].
        confidence: One-sided confidence of `upper` and `lower`.

    Returns:
        The gap; bounds are NaN when either side has fewer than 2 seeds (no spread known).
    """
    gap = float(np.mean(full) - np.mean(lora))
    if len(full) < 2 or len(lora) < 2:
        return Gap(gap, math.nan, math.nan, math.nan, math.nan)
    parts = [_variance(side) / len(side) for side in (full, lora)]
    se = math.sqrt(sum(parts))
    if se == 0.0:  # collapsed seeds on both sides: no spread, the interval is the point
        return Gap(gap, gap, gap, gap, math.inf)
    df = se**4 / sum(
        part**2 / (len(side) - 1) for part, side in zip(parts, (full, lora), strict=True)
    )
    one, two = stats.t.ppf(confidence, df), stats.t.ppf(1 - (1 - confidence) / 2, df)
    return Gap(gap, float(gap + one * se), float(gap - two * se), float(gap + two * se), float(df))


def seeds_needed(
    full: np.ndarray, lora: np.ndarray, tolerance: float, confidence: float = CONFIDENCE
) -> int | None:
    """Seeds per side at which the observed gap's upper bound would clear `tolerance`.

    Args:
        full: The full finetune's test accuracies, shape [n_f].
        lora: One rank's test accuracies, shape [n_l].
        tolerance: The non-inferiority margin.

    Returns:
        The smallest n ≥ 3 (see the module docstring); None when the gap itself is at or
        above the tolerance, when no spread is known (one seed on both sides), or past
        `MAX_SEEDS_ESTIMATE`.
    """
    gap = float(np.mean(full) - np.mean(lora))
    if gap >= tolerance:
        return None
    known = [_variance(side) for side in (full, lora) if len(side) >= 2]
    if not known:
        return None
    var_full = _variance(full) if len(full) >= 2 else known[0]
    var_lora = _variance(lora) if len(lora) >= 2 else known[0]
    total = var_full + var_lora
    if total == 0.0:
        return MIN_SEEDS
    for n in range(MIN_SEEDS, MAX_SEEDS_ESTIMATE + 1):
        df = (n - 1) * total**2 / (var_full**2 + var_lora**2)
        if gap + stats.t.ppf(confidence, df) * math.sqrt(total / n) < tolerance:
            return n
    return None


@dataclass(frozen=True)
class RankTest:
    """One rank's place in the sequence.

    Attributes:
        rank: The LoRA rank.
        mean: Its mean test accuracy at its chosen learning rate.
        interval: Its gap to the full finetune (`Gap`).
        seeds: Finished seeds of the rank and of the full finetune.
        params: Its trainable parameters.
        full_rank: True when the rank is at least every adapted layer's full rank, min(out,
            in), as its runs recorded it (`full_rank_at`; False for tables without it).
        verdict: One of PASS, FAIL, FEW_SEEDS, NOT_TESTED (after the sequence stopped) and
            NO_SAVING (as many trainable parameters as the full finetune, or more).
        needed: Estimated seeds per side for the bound to clear the tolerance (None: cannot).
    """

    rank: int
    mean: float
    interval: Gap
    seeds: tuple[int, int]
    params: float
    full_rank: bool
    verdict: str
    needed: int | None


def _points(value: float) -> str:
    """An accuracy difference in points (0.0123 → "1.23"); "?" when unknown."""
    return "?" if math.isnan(value) else f"{100 * value:.2f}"


@dataclass(frozen=True)
class Recommendation:
    """The recommended rank of one method, or why there is none.

    Attributes:
        method: The LoRA method.
        rank: The recommended rank; None when no rank was shown non-inferior.
        full_mean: The tuned full finetune's mean test accuracy.
        full_params: The full finetune's trainable parameters.
        tests: Every rank's test, largest rank first (the order of the sequence).
        confidence: The one-sided confidence of every test (`study_confidence`).
        measure: What the test accuracy is taken on when it is not the whole test set (a
            study testing classes it does not finetune on is judged on fit); "" otherwise.
    """

    method: str
    rank: int | None
    full_mean: float
    full_params: float
    tests: tuple[RankTest, ...]
    confidence: float = CONFIDENCE
    measure: str = ""

    @property
    def chosen(self) -> RankTest | None:
        """The recommended rank's test."""
        return next((t for t in self.tests if t.rank == self.rank), None)

    @property
    def stop(self) -> RankTest | None:
        """The rank where the sequence stopped (it failed or had too few seeds), if any."""
        return next((t for t in self.tests if t.verdict in (FAIL, FEW_SEEDS)), None)

    def sentence(self, tolerance: float) -> str:
        """One line for the terminal and the top of report.md."""
        named = [m for m in (self.method not in ("", "default") and self.method, self.measure) if m]
        head = "recommended rank" + (f" ({'; '.join(named)})" if named else "")
        margin = f"{100 * tolerance:g} point(s)"
        chosen, stop = self.chosen, self.stop
        if chosen is not None:
            share = 100 * chosen.params / self.full_params if self.full_params else math.nan
            text = (
                f"{head}: r={chosen.rank}: {_points(chosen.interval.gap)} points below the full "
                f"finetune ({self.full_mean:.4f}), one-sided {level(self.confidence)} upper bound "
                f"{_points(chosen.interval.upper)} < {margin} ({chosen.seeds[0]} vs "
                f"{chosen.seeds[1]} seeds); {chosen.params:,.0f} trainable parameters, "
                f"{share:.3g}% of the full finetune's {self.full_params:,.0f}"
            )
            why = "" if stop is None else _why(stop, margin, self.confidence)
            return text + (f"; the sequence stopped at {why}" if why else "")
        limit = self._rank_limit(tolerance)
        if stop is None:
            return f"{head}: none; no rank trains fewer parameters than the full finetune{limit}"
        why = _why(stop, margin, self.confidence)
        return f"{head}: none; the sequence stopped at its first rank, {why}{limit}"

    def _rank_limit(self, tolerance: float) -> str:
        """ "; r=…, full rank …, so the gap is not a rank limit" when the largest rank (tested or
        not) is full rank everywhere, has ≥ MIN_SEEDS a side and an upper bound ≥ tolerance."""
        largest = self.tests[0] if self.tests else None
        if largest is None or not largest.full_rank or min(largest.seeds) < MIN_SEEDS:
            return ""
        if not largest.interval.upper >= tolerance:  # NaN: no spread known, nothing shown
            return ""
        return (
            f"; r={largest.rank}, full rank in every adapted layer (r ≥ min(in, out) of each), is "
            f"still {_points(largest.interval.gap)} points below (one-sided "
            f"{level(self.confidence)} upper bound {_points(largest.interval.upper)}), so the gap "
            "is not a rank limit"
        )


def _why(test: RankTest, margin: str, confidence: float) -> str:
    """Why the sequence stopped at `test`, in a clause."""
    seeds = f"{test.seeds[0]} vs {test.seeds[1]} seeds"
    estimate = (
        f"{_points(test.interval.gap)} points below (one-sided {level(confidence)} upper bound "
    )
    estimate += f"{_points(test.interval.upper)}, {seeds})"
    if test.verdict == FAIL:
        return f"r={test.rank}: {estimate}, not below {margin}"
    if test.needed is None:
        need = "no number of seeds would show it within the tolerance"
    else:
        need = f"about {test.needed} seeds per side would settle it"
    return f"r={test.rank}, too few seeds for a test (≥ {MIN_SEEDS} a side): {estimate}; {need}"


def _sequence(
    method: str,
    runs: pd.DataFrame,
    full: np.ndarray,
    full_params: float,
    tolerance: float,
    confidence: float,
) -> Recommendation:
    """Test one method's ranks, largest first, and stop at the first that fails."""
    by_rank = {int(rank): _best_alpha(group) for rank, group in runs.groupby("rank")}
    params = {rank: float(group["trainable_params"].median()) for rank, group in by_rank.items()}
    full_at = {rank: group["full_rank_at"].max() for rank, group in by_rank.items()}
    tests, recommended, stopped = [], None, False
    for rank in sorted(by_rank, reverse=True):
        values = by_rank[rank]["test_acc"].to_numpy(dtype=float)
        interval = welch_gap(full, values, confidence)
        if params[rank] >= full_params:  # NaN compares False: unknown counts are not refused
            verdict = NO_SAVING
        elif stopped:
            verdict = NOT_TESTED
        elif min(len(values), len(full)) < MIN_SEEDS:
            verdict, stopped = FEW_SEEDS, True
        elif interval.upper < tolerance:
            verdict, recommended = PASS, rank
        else:
            verdict, stopped = FAIL, True
        needed = None if verdict == PASS else seeds_needed(full, values, tolerance, confidence)
        seeds = (len(values), len(full))
        tests.append(
            RankTest(rank, float(values.mean()), interval, seeds, params[rank],
                     bool(rank >= full_at[rank]), verdict, needed)
        )  # fmt: skip
    full_mean = float(full.mean())
    return Recommendation(method, recommended, full_mean, full_params, tuple(tests), confidence)


def _best_alpha(group: pd.DataFrame) -> pd.DataFrame:
    """One rank's rows at one α: with an α grid, the α whose chosen rows have the best mean
    val_acc (validation decides, as for learning rates; a table without val_acc takes the
    smallest α); seeds are never pooled across α."""
    if group["alpha"].nunique(dropna=False) <= 1:
        return group
    if group["val_acc"].isna().all():
        return group[group["alpha"] == group["alpha"].min()]
    best = group.groupby("alpha")["val_acc"].mean().idxmax()
    return group[group["alpha"] == best]


def recommend(
    df: pd.DataFrame, tolerance: float = DEFAULT_TOLERANCE, confidence: float = CONFIDENCE
) -> list[Recommendation]:
    """The recommended rank of each method (see the module docstring), from the tuned rows.

    A study that tests classes it does not finetune on is judged on fit, the test accuracy on
    the finetune classes (`forgetting.fit_accuracy`): validation holds those classes only, so
    the learning rates are chosen for it, and the recommendation's `measure` says so.

    Args:
        df: A normalized results table (`selected` is recomputed here from val_acc).
        tolerance: The non-inferiority margin (0.01 = 1 point of test accuracy).
        confidence: The one-sided confidence of each test (`study_confidence`).

    Returns:
        One recommendation per method; [] for a study without accuracy or without a finished
        full finetune.
    """
    if "test_acc" not in df or df["test_acc"].isna().all():
        return []
    split = class_split(df)
    if split is not None:
        df = df.assign(test_acc=fit_accuracy(df, split))
    tuned = df[selected_mask(df)]
    full_rows = tuned[tuned["stage"] == "full_finetune"].dropna(subset=["test_acc"])
    if full_rows.empty:
        return []
    full = full_rows["test_acc"].to_numpy(dtype=float)
    full_params = float(full_rows["trainable_params"].median())
    lora = tuned[tuned["stage"] == "lora"].dropna(subset=["rank", "test_acc"])
    measure = "" if split is None else split.measure()
    return [
        replace(
            _sequence(str(method), runs, full, full_params, tolerance, confidence), measure=measure
        )
        for method, runs in lora.groupby("method", sort=False)
    ]


def settlement(test: RankTest, tolerance: float) -> str:
    """Whether one rank's answer is settled: SETTLED_PASS (upper bound < tolerance),
    SETTLED_FAIL (lower bound > tolerance) or UNSETTLED (neither, or < MIN_SEEDS a side)."""
    if min(test.seeds) < MIN_SEEDS or math.isnan(test.interval.upper):
        return UNSETTLED
    if test.interval.upper < tolerance:
        return SETTLED_PASS
    if test.interval.lower > tolerance:
        return SETTLED_FAIL
    return UNSETTLED


def unsettled_ranks(recommendation: Recommendation, tolerance: float) -> tuple[int, ...]:
    """The ranks whose answer the recommendation still waits for: the ranks of the fixed
    sequence (fewer trainable parameters than the full finetune), largest first, up to and
    including the first settled fail, that are not settled. Empty: the answer is settled."""
    waiting = []
    for test in recommendation.tests:
        if test.verdict == NO_SAVING:
            continue
        state = settlement(test, tolerance)
        if state == SETTLED_FAIL:
            break
        if state == UNSETTLED:
            waiting.append(test.rank)
    return tuple(waiting)
