"""The "Recommended rank" section of report.md: the rule, the answer, every rank's test."""

from __future__ import annotations

import math

import pandas as pd

from lora_lab.report.tables import markdown_table
from lora_lab.report.verdict import (
    MIN_SEEDS,
    NO_SAVING,
    NOT_TESTED,
    PASS,
    UNSETTLED,
    RankTest,
    Recommendation,
    level,
    recommend,
    settlement,
)


def rule_sentence(tolerance: float, confidence: float) -> str:
    """The recommendation rule, in one sentence (with the level of `sweep.seeds=auto`)."""
    auto = "" if confidence == 0.95 else " (95% split over the looks of `sweep.seeds=auto`)"
    return (
        "**Rule:** a rank is recommended when it is non-inferior to the full finetune, that is "
        f"when the one-sided {level(confidence)}{auto} Welch upper bound of its gap in mean "
        "test accuracy (each side "
        f"at its validation-chosen learning rate, ≥ {MIN_SEEDS} seeds a side) is below the "
        f"tolerance of {100 * tolerance:g} point(s) (`report.tolerance`), testing the ranks that "
        "train fewer parameters than the full finetune as a fixed sequence from the largest "
        "down and recommending the last one that passes before the first that fails."
    )


def _verdict(test: RankTest) -> str:
    if test.verdict == NO_SAVING:
        return "never: as many trainable parameters as the full finetune, or more"
    if test.verdict == NOT_TESTED:
        return "not tested (the sequence stopped above)"
    return test.verdict


def _interval(test: RankTest) -> str:
    low, high = test.interval.low, test.interval.high
    if math.isnan(low):
        return "unknown (one seed)"
    return f"[{100 * low:.2f}, {100 * high:.2f}]"


def _settled(test: RankTest, tolerance: float) -> str:
    """ "yes" or "no" for a tested rank (see `verdict.settlement`); "" for the others."""
    if test.verdict in (NO_SAVING, NOT_TESTED):
        return ""
    return "no" if settlement(test, tolerance) == UNSETTLED else "yes"


def rank_tests_table(recommendation: Recommendation, tolerance: float) -> pd.DataFrame:
    """One row per rank of one method, largest first: gap, intervals, seeds, verdict and
    whether it is settled.

    Args:
        recommendation: One method's `Recommendation`.
        tolerance: `report.tolerance`.

    Returns:
        Text columns for `markdown_table`; gaps and bounds in accuracy points.
    """
    full = recommendation.full_params
    rows = []
    for test in recommendation.tests:
        share = f" ({100 * test.params / full:.3g}%)" if full and not math.isnan(full) else ""
        upper = test.interval.upper
        rows.append(
            {
                "rank": f"{test.rank}" + (" (full rank)" if test.full_rank else ""),
                "trainable params": f"{test.params:,.0f}{share}",
                "seeds (LoRA / full)": f"{test.seeds[0]} / {test.seeds[1]}",
                "fit" if recommendation.measure else "test_acc": f"{test.mean:.4f}",
                "gap (points)": f"{100 * test.interval.gap:.2f}",
                f"two-sided {level(recommendation.confidence)} interval": _interval(test),
                f"one-sided {level(recommendation.confidence)} upper bound": (
                    "" if math.isnan(upper) else f"{100 * upper:.2f}"
                ),
                "verdict": _verdict(test),
                "settled": _settled(test, tolerance),
                "seeds needed": _needed(test),
            }
        )
    return pd.DataFrame(rows)


def _needed(test: RankTest) -> str:
    if test.verdict in (PASS, NO_SAVING):
        return ""
    return "cannot clear" if test.needed is None else f"~{test.needed}"


def recommended_section(df: pd.DataFrame, tolerance: float, confidence: float) -> list[str]:
    """The answer first: the rule, the recommended rank per method, and every rank's test.

    Args:
        df: A normalized results table.
        tolerance: `report.tolerance`.
        confidence: The one-sided confidence of each test (`verdict.study_confidence`).

    Returns:
        Markdown lines; [] when the study has no accuracy or no finished full finetune.
    """
    recommendations = recommend(df, tolerance, confidence)
    if not recommendations:
        return []
    lines = ["## Recommended rank", "", rule_sentence(tolerance, confidence), ""]
    lines += [f"- {r.sentence(tolerance)}." for r in recommendations]
    lines.append("")
    for recommendation in recommendations:
        if len(recommendations) > 1:
            lines += [f"### {recommendation.method}", ""]
        lines.append(markdown_table(rank_tests_table(recommendation, tolerance)))
    lines += [
        "Gap = mean full-finetune test accuracy − mean LoRA test accuracy, in points, at each "
        "side's chosen learning rate; intervals are Welch's (a side with collapsed seeds has no "
        "spread: with none on either side the interval is the gap itself). *Seeds needed*: "
        f"the smallest n ≥ {MIN_SEEDS} seeds per side at which the observed gap's upper bound, "
        "with the observed spreads, would fall below the tolerance; *cannot clear* when the "
        "gap itself is at or above it (or no spread is known). *Settled*: the rank's one-sided "
        "interval clears the tolerance on one side (upper bound below it, or lower bound "
        f"above it, ≥ {MIN_SEEDS} seeds a side); `sweep.seeds=auto` adds seeds until every rank "
        "tested up to the first settled fail is settled, or `report.max_seeds` is reached. "
        "*Full rank*: the rank is at least min(in, out) of every adapted layer (`full_rank_at` "
        "in results.csv), so every update of those layers is within its reach; tables written before that "
        "column mark none. *Fit*: in a study that tests classes it does not finetune on, the "
        "gap is taken on the finetune classes (see Fit and forgetting).",
        "",
    ]
    return lines
