"""The "Claims" section of report.md: each LoRA variant's published claim, tested on the study.

Every variant is compared with plain LoRA (method `default`), each side at its own learning
rate chosen on validation per rank (the `selected` rows, `report.selection`), at the ranks both
ran. A claim is one or more *parts*, each a difference d (variant − LoRA) of a measure:

- DoRA "helps most at low rank": d of test accuracy averaged over the low ranks (below the
  median of the study's ranks), and that minus the same average over the high ranks (above
  the median).
- rsLoRA "lets high ranks learn" (α fixed, so LoRA's α/r shrinks where rsLoRA's α/√r does
  less): d of test accuracy averaged over the high ranks.
- PiSSA "converges faster" and LoRA+ "trains faster": d of the *validation AUC*, a run's mean
  validation accuracy over its per-epoch validation points (the area under its validation
  curve divided by its length, from `curves.csv`), averaged over every rank.

Each d is a linear contrast Σ cᵢ·mean(xᵢ) of per-seed values; its standard error is
sqrt(Σ cᵢ²·sᵢ²/nᵢ) and its degrees of freedom Welch–Satterthwaite's (`scipy.stats.t` gives the
quantiles). A part is *shown* when its one-sided 95% lower bound is above 0, *refuted* when
its one-sided 95% upper bound is below the tolerance (`report.tolerance`: any gain is smaller
than the margin), else *open*. A claim *holds* when every part is shown (an
intersection-union test, 5% without a multiplicity correction), *does not hold* when some
part is refuted, and is *inconclusive* otherwise: a difference that is not significant never
makes a claim hold or fail by itself.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from lora_lab.report.selection import chosen_learning_rates, selected_mask
from lora_lab.report.tables import markdown_table
from lora_lab.results import normalize_results, ok_mask

BASELINE = "default"
CONFIDENCE = 0.95
HOLDS, FAILS, OPEN = "holds", "does not hold", "inconclusive"
SHOWN, REFUTED, UNDECIDED = "shown", "refuted", "open"
TEST_ACC, VAL_AUC = "test_acc", "val_auc"
MEASURE_NAMES = {TEST_ACC: "test accuracy", VAL_AUC: "validation AUC"}


@dataclass(frozen=True)
class Claim:
    """A published claim: the variant (a `conf/lora/` option), its words, what is measured
    over which ranks, and whether its gain must also be larger at low ranks than at high."""

    method: str
    text: str
    measure: str
    ranks: str  # "low", "high" or "all"
    low_over_high: bool = False
    definition: str = ""


CLAIMS = (
    Claim("dora", "DoRA helps most at low rank", TEST_ACC, "low", True,
          "DoRA's test accuracy minus LoRA's, averaged over the low ranks, is above 0, and "
          "exceeds the same difference averaged over the high ranks."),
    Claim("rslora", "rsLoRA lets high ranks learn", TEST_ACC, "high", False,
          "rsLoRA's test accuracy minus LoRA's (α fixed), averaged over the high ranks, is "
          "above 0."),
    Claim("pissa", "PiSSA converges faster", VAL_AUC, "all", False,
          "PiSSA's validation AUC minus LoRA's, averaged over every rank, is above 0."),
    Claim("loraplus", "LoRA+ trains faster", VAL_AUC, "all", False,
          "LoRA+'s validation AUC minus LoRA's, averaged over every rank, is above 0."),
)  # fmt: skip


@dataclass(frozen=True)
class Estimate:
    """A contrast with its one-sided bounds (`lower`, `upper`) and two-sided interval at the
    same confidence (`low`, `high`); bounds NaN when some sample has fewer than 2 values."""

    value: float
    lower: float
    upper: float
    low: float
    high: float


def welch_contrast(
    terms: Sequence[tuple[float, np.ndarray]], confidence: float = CONFIDENCE
) -> Estimate:
    """Σ cᵢ·mean(xᵢ) with Welch–Satterthwaite bounds (see the module docstring).

    Args:
        terms: (coefficient cᵢ, per-seed values xᵢ of shape [nᵢ]) pairs.
        confidence: One-sided confidence of `lower` and `upper`.
    """
    value = float(sum(c * np.mean(x) for c, x in terms))
    if any(len(x) < 2 for _, x in terms):
        return Estimate(value, *(math.nan,) * 4)
    parts = [c * c * float(np.var(x, ddof=1)) / len(x) for c, x in terms]
    se = math.sqrt(sum(parts))
    if se == 0.0:
        return Estimate(value, value, value, value, value)
    df = se**4 / sum(p * p / (len(x) - 1) for p, (_, x) in zip(parts, terms, strict=True) if p)
    one, two = stats.t.ppf(confidence, df), stats.t.ppf(1 - (1 - confidence) / 2, df)
    return Estimate(value, value - one * se, value + one * se, value - two * se, value + two * se)


@dataclass(frozen=True)
class Part:
    """One tested difference of a claim: its words, ranks, estimate, seeds and state."""

    what: str
    ranks: tuple[int, ...]
    estimate: Estimate
    seeds: tuple[int, int]  # fewest seeds at a rank: variant, LoRA
    state: str


@dataclass(frozen=True)
class ClaimResult:
    """A claim's verdict, its parts, and why it could not be tested (when it could not)."""

    claim: Claim
    verdict: str
    parts: tuple[Part, ...]
    reason: str = ""


def _state(estimate: Estimate, tolerance: float) -> str:
    if estimate.lower > 0:
        return SHOWN
    if estimate.upper < tolerance:
        return REFUTED
    return UNDECIDED


def run_values(df: pd.DataFrame, curves: pd.DataFrame) -> pd.DataFrame:
    """The selected finished LoRA runs with their `test_acc` and `val_auc` (NaN without a full
    validation curve), one α per (method, rank): the best mean val_acc when α varies."""
    df = normalize_results(df)
    lora = df[selected_mask(df) & ok_mask(df) & (df["stage"] == "lora")].dropna(subset=["rank"])
    best = lora.groupby(["method", "rank", "alpha"])["val_acc"].mean().fillna(-1.0)
    keep = best.groupby(level=["method", "rank"]).idxmax().tolist()
    lora = lora[pd.MultiIndex.from_frame(lora[["method", "rank", "alpha"]]).isin(keep)]
    auc = pd.Series(dtype=float)
    if not curves.empty and "val_acc" in curves:
        val = curves.dropna(subset=["val_acc"]).astype({"run_id": str})
        val = val[val["run_id"].isin(lora["run_id"])]
        points = val.groupby("run_id")["val_acc"].agg(["mean", "count"])
        auc = points.loc[points["count"] == points["count"].max(), "mean"]  # whole curves only
    return lora.assign(val_auc=lora["run_id"].map(auc).astype(float))


def _samples(runs: pd.DataFrame, method: str, measure: str) -> dict[int, np.ndarray]:
    rows = runs[runs["method"] == method].dropna(subset=[measure])
    return {int(r): g[measure].to_numpy(dtype=float) for r, g in rows.groupby("rank")}


def split_ranks(ranks: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(low, high): the ranks below and above the median rank (the median itself in neither)."""
    middle = float(np.median(ranks)) if len(ranks) else math.nan
    return tuple(r for r in ranks if r < middle), tuple(r for r in ranks if r > middle)


def _span(ranks: Sequence[int]) -> str:
    return f"r={ranks[0]}" if len(ranks) == 1 else f"r={ranks[0]}–{ranks[-1]}"


def _gain_terms(variant, lora, ranks, sign: float = 1.0) -> list[tuple[float, np.ndarray]]:
    weight = sign / len(ranks)
    return [t for r in ranks for t in ((weight, variant[r]), (-weight, lora[r]))]


def judge_claim(claim: Claim, runs: pd.DataFrame, tolerance: float) -> ClaimResult:
    """The verdict of one claim on a study's selected runs (`run_values`)."""
    variant = _samples(runs, claim.method, claim.measure)
    lora = _samples(runs, BASELINE, claim.measure)
    ranks = sorted(r for r in variant if r in lora and min(len(variant[r]), len(lora[r])) >= 2)
    if not variant:
        missing = "no validation curves" if claim.measure == VAL_AUC else "no finished runs"
        return ClaimResult(claim, OPEN, (), f"{claim.method}: {missing}")
    low, high = split_ranks(ranks)
    tested = {"low": low, "high": high, "all": tuple(ranks)}[claim.ranks]
    if not tested or (claim.low_over_high and not high):
        why = f"too few ranks with ≥ 2 seeds on both sides ({len(ranks)})"
        return ClaimResult(claim, OPEN, (), why)
    name = MEASURE_NAMES[claim.measure]
    specs = [(f"{name} gain at {_span(tested)}", tested, _gain_terms(variant, lora, tested))]
    if claim.low_over_high:
        terms = _gain_terms(variant, lora, low) + _gain_terms(variant, lora, high, -1.0)
        specs.append((f"gain at {_span(low)} minus gain at {_span(high)}", low + high, terms))
    parts = []
    for what, part_ranks, terms in specs:
        estimate = welch_contrast(terms)
        seeds = (min(len(variant[r]) for r in part_ranks), min(len(lora[r]) for r in part_ranks))
        parts.append(Part(what, tuple(part_ranks), estimate, seeds, _state(estimate, tolerance)))
    states = {part.state for part in parts}
    verdict = HOLDS if states == {SHOWN} else FAILS if REFUTED in states else OPEN
    return ClaimResult(claim, verdict, tuple(parts))


def _points(value: float) -> str:
    return "?" if math.isnan(value) else f"{100 * value:+.2f}"


def _claims_table(results: Sequence[ClaimResult]) -> pd.DataFrame:
    rows = []
    for result in results:
        first = {"claim": result.claim.text, "verdict": f"**{result.verdict}**"}
        if not result.parts:
            rows.append({**first, "test": result.reason})
        for i, part in enumerate(result.parts):
            e = part.estimate
            rows.append({
                **(first if i == 0 else {"claim": "", "verdict": ""}),
                "test": part.what, "difference (points)": _points(e.value),
                "two-sided 95% interval": f"[{_points(e.low)}, {_points(e.high)}]",
                "one-sided 95% bounds": f"> {_points(e.lower)}, < {_points(e.upper)}",
                "part": part.state, "seeds per rank (variant / LoRA)": f"{part.seeds[0]} / {part.seeds[1]}",
            })  # fmt: skip
    return pd.DataFrame(rows).fillna("")


def per_rank_table(runs: pd.DataFrame, claims: Sequence[Claim]) -> pd.DataFrame:
    """Each variant's difference from LoRA per rank, in its claim's measure (points, with the
    two-sided 95% Welch interval)."""
    ranks = sorted(int(r) for r in runs["rank"].unique())
    table = pd.DataFrame({"rank": [str(r) for r in ranks]})
    for claim in claims:
        variant = _samples(runs, claim.method, claim.measure)
        lora = _samples(runs, BASELINE, claim.measure)
        cells = []
        for rank in ranks:
            if rank not in variant or rank not in lora:
                cells.append("")
                continue
            e = welch_contrast([(1.0, variant[rank]), (-1.0, lora[rank])])
            cells.append(f"{_points(e.value)} [{_points(e.low)}, {_points(e.high)}]")
        table[f"{claim.method} ({MEASURE_NAMES[claim.measure]})"] = cells
    return table


def tuned_lr_table(df: pd.DataFrame) -> pd.DataFrame:
    """The learning rate chosen on validation per method (rows) and rank (columns); "*" marks
    a choice at an end of its grid (a bound), and the full finetune's has its own row."""
    chosen = chosen_learning_rates(normalize_results(df))
    cell = chosen["learning_rate"].map(lambda v: f"{v:g}") + chosen["at_edge"].map(
        lambda edge: "*" if edge else ""
    )
    chosen = chosen.assign(cell=cell)
    lora = chosen[chosen["stage"] == "lora"].dropna(subset=["rank"])
    table = lora.pivot_table(index="method", columns="rank", values="cell", aggfunc="first")
    table.columns = [f"r={r:g}" for r in table.columns]
    table = table.reset_index().fillna("")
    full = chosen[chosen["stage"] == "full_finetune"]
    if not full.empty:
        table["full finetune"] = ""
        row = {"method": "full finetune", "full finetune": full["cell"].iloc[0]}
        table = pd.concat([table, pd.DataFrame([row])], ignore_index=True).fillna("")
    return table


def claims_section(df: pd.DataFrame, curves: pd.DataFrame, tolerance: float) -> list[str]:
    """The report's "Claims" section; [] unless plain LoRA and a variant with a claim ran.

    Args:
        df: The results table.
        curves: The study's per-epoch curves (`curves.study_curves`), possibly empty.
        tolerance: `report.tolerance`, the margin below which a gain is refuted.
    """
    runs = run_values(df, curves)
    methods = set(runs["method"])
    claims = [claim for claim in CLAIMS if claim.method in methods]
    if BASELINE not in methods or not claims:
        return []
    results = [judge_claim(claim, runs, tolerance) for claim in claims]
    low, high = split_ranks(sorted(int(r) for r in runs["rank"].unique()))
    grids = chosen_learning_rates(normalize_results(df))["grid"].map(len)
    lines = [
        "## Claims",
        "",
        "Each variant against plain LoRA, each side at its own learning rate chosen on "
        "validation per rank (table below). A difference is variant − LoRA in points; its "
        "bounds are Welch's over seeds (a linear contrast when averaged over ranks). A part is "
        "*shown* when its one-sided 95% lower bound is above 0, *refuted* when its one-sided 95% "
        f"upper bound is below the tolerance of {100 * tolerance:g} point(s) (any gain is "
        "smaller than that). A claim **holds** when every part is shown, **does not hold** when "
        "a part is refuted, and is **inconclusive** otherwise (each claim at 5% on its own, no "
        "correction across claims). Low ranks: "
        f"{', '.join(map(str, low)) or 'none'}; high ranks: {', '.join(map(str, high)) or 'none'}"
        " (below and above the median rank). *Validation AUC*: a run's mean validation accuracy "
        "over its per-epoch validation points (`curves.csv`).",
        "",
        *[f"- {claim.text}: {claim.definition}" for claim in claims],
        "",
        markdown_table(_claims_table(results)),
    ]
    if grids.max() <= 1:
        lines += ["_No learning rate was tuned: every run used one value, so a difference "
                  "may be the learning rate's, not the method's._", ""]  # fmt: skip
    lines += ["Difference from plain LoRA per rank (points, two-sided 95% interval):", ""]
    lines.append(markdown_table(per_rank_table(runs, claims)))
    lines += ["Learning rate chosen on validation (`*`: at an end of its grid, a bound):", ""]
    lines += [markdown_table(tuned_lr_table(df)), ""]
    return lines
