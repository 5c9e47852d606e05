"""The recommended rank: non-inferiority, tested as a fixed sequence from the largest rank down.

Every number here is checked by hand in a comment: gap = mean(full) − mean(LoRA); Welch's
se = sqrt(s_f²/n_f + s_l²/n_l) (sample variances), ν = se⁴ / Σ (s²/n)²/(n − 1); the one-sided
95% upper bound is gap + t(0.95, ν)·se. t(0.95, 4) = 2.1318, t(0.95, 2) = 2.9200.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import stats

from lora_lab.report.rank_table import recommended_section
from lora_lab.report.verdict import (
    FAIL,
    FEW_SEEDS,
    NO_SAVING,
    NOT_TESTED,
    PASS,
    SETTLED_FAIL,
    SETTLED_PASS,
    UNSETTLED,
    recommend,
    settlement,
    study_confidence,
    unsettled_ranks,
    welch_gap,
)
from lora_lab.results import RunResult
from tests.report.test_report_selection import full, lora, table

# The default study's tuned full finetune (experiments/fashion_mnist_which_rank) and its r=1.
DEFAULT_FULL = [0.9602, 0.9588, 0.9566]
DEFAULT_R1 = [0.8578, 0.7304, 0.8996]


def recommendation(ranks: dict[int, list[float]], baseline: list[float], params=None, tol=0.01):
    params = params or {}
    rows = [
        lora(r, 0.001, s, val=0.5, test=t, params=params.get(r, 1000))
        for r, accs in ranks.items()
        for s, t in enumerate(accs)
    ]
    rows += [full(0.001, s, val=0.5, test=t) for s, t in enumerate(baseline)]
    (result,) = recommend(table(rows), tol)
    return result


def table_of(ranks: dict[int, list[float]], baseline: list[float] = (0.900, 0.901, 0.899)):
    """The results table of `recommendation`'s rows."""
    rows = [
        lora(r, 0.001, s, val=0.5, test=t) for r, accs in ranks.items() for s, t in enumerate(accs)
    ]
    return table(rows + [full(0.001, s, val=0.5, test=t) for s, t in enumerate(baseline)])


def by_rank(result):
    return {test.rank: test for test in result.tests}


def test_a_noisy_rank_the_old_rule_passed_is_refused():
    # The default study's r=1: mean 0.82927 against 0.95853, gap 0.12927. s_l² = 7.768e-3,
    # s_f² = 3.293e-6: se = sqrt(2.5893e-3 + 1.10e-6) = 0.05090, ν = 2.002: the old one-sided
    # Welch test gives p = 0.063 ≥ 0.05 ("not significantly below"); the bound is
    # 0.12927 + 2.920·0.05090 = 0.2779, far above 0.01: refused.
    old_p = stats.ttest_ind(DEFAULT_R1, DEFAULT_FULL, equal_var=False, alternative="less").pvalue
    assert old_p == pytest.approx(0.063, abs=1e-3)
    result = recommendation({1: DEFAULT_R1}, DEFAULT_FULL)
    (test,) = result.tests
    assert result.rank is None and test.verdict == FAIL
    assert test.interval.gap == pytest.approx(0.12927, abs=1e-5)
    assert test.interval.upper == pytest.approx(0.2779, abs=5e-4)
    # Within the tolerance on the mean too (the old rule's other half): full 0.940, 0.945, 0.950
    # (mean 0.945, s² = 2.5e-5), LoRA 0.955, 0.910, 0.945 (mean 0.93667, s² = 5.583e-4): gap
    # 0.00833 ≤ 0.01 and p = 0.30; se = 0.013944, ν = 2.179, t(0.95, 2.179) = 2.763: bound
    # 0.00833 + 2.763·0.013944 = 0.0469.
    noisy = [0.955, 0.910, 0.945]
    old_p = stats.ttest_ind(noisy, [0.940, 0.945, 0.950], equal_var=False, alternative="less")
    assert old_p.pvalue > 0.05
    result = recommendation({4: noisy}, [0.940, 0.945, 0.950])
    assert result.rank is None and result.tests[0].interval.upper == pytest.approx(0.0469, abs=2e-4)
    assert "none; the sequence stopped at its first rank, r=4: 0.83 points below" in (
        result.sentence(0.01)
    )


def test_a_tight_rank_inside_the_tolerance_the_old_rule_refused_is_accepted():
    # full 0.936, 0.937, 0.938; r=2 0.930, 0.931, 0.932: gap 0.006, s² = 1e-6 on both sides,
    # se = sqrt(2e-6/3) = 8.165e-4, ν = 4: old p = 0.0009 (significantly below: refused). Bound
    # 0.006 + 2.1318·8.165e-4 = 0.00774 < 0.01: non-inferior, recommended.
    old = stats.ttest_ind([0.930, 0.931, 0.932], [0.936, 0.937, 0.938], equal_var=False,
                          alternative="less")  # fmt: skip
    assert old.pvalue == pytest.approx(0.0009, abs=1e-4)
    result = recommendation({2: [0.930, 0.931, 0.932]}, [0.936, 0.937, 0.938])
    assert result.rank == 2 and result.tests[0].verdict == PASS
    assert result.tests[0].interval.upper == pytest.approx(0.00774, abs=1e-5)
    assert result.sentence(0.01).startswith(
        "recommended rank: r=2: 0.60 points below the full finetune (0.9370), one-sided 95% "
        "upper bound 0.77 < 1 point(s) (3 vs 3 seeds); 1,000 trainable parameters, 1.82% of "
        "the full finetune's 55,050"
    )


def test_the_sequence_stops_at_the_first_failing_rank():
    # full 0.936, 0.937, 0.938. r=16 0.935, 0.936, 0.937: gap 0.001, bound 0.00274: pass.
    # r=8 0.955, 0.900, 0.940 is noisy: fails. r=4 (the tight rank above, bound 0.00774)
    # would pass, but the sequence stopped at r=8: r=16 is the answer.
    tight = [0.930, 0.931, 0.932]
    result = recommendation(
        {16: [0.935, 0.936, 0.937], 8: [0.955, 0.900, 0.940], 4: tight}, [0.936, 0.937, 0.938]
    )
    tests = by_rank(result)
    assert [t.rank for t in result.tests] == [16, 8, 4]
    assert (tests[16].verdict, tests[8].verdict, tests[4].verdict) == (PASS, FAIL, NOT_TESTED)
    assert result.rank == 16 and result.stop is tests[8]
    assert tests[4].interval.upper == pytest.approx(0.00774, abs=1e-5)  # shown all the same
    assert "; the sequence stopped at r=8:" in result.sentence(0.01)


def test_fewer_than_three_seeds_give_the_estimate_and_the_seeds_needed():
    # full 0.940, 0.944 (s² = 8e-6), r=8 0.935, 0.937 (s² = 2e-6): gap 0.006. With n a side,
    # ν_n = (n − 1)·(1e-5)²/(6.4e-11 + 4e-12) = 1.4706(n − 1) and the bound is
    # 0.006 + t(0.95, ν_n)·sqrt(1e-5/n): n = 3 → 0.006 + 2.36·0.001826 = 0.0103 (no);
    # n = 4 → 0.006 + 2.08·0.001581 = 0.0093 (yes): 4 seeds a side.
    result = recommendation({8: [0.935, 0.937], 1: [0.90, 0.91]}, [0.940, 0.944])
    tests = by_rank(result)
    assert result.rank is None and tests[8].verdict == FEW_SEEDS and tests[8].needed == 4
    assert tests[8].interval.gap == pytest.approx(0.006)
    assert tests[1].verdict == NOT_TESTED and tests[1].needed is None  # gap 3.7 ≥ 1 point
    sentence = result.sentence(0.01)
    assert "r=8, too few seeds for a test (≥ 3 a side): 0.60 points below" in sentence
    assert "2 vs 2 seeds" in sentence and "about 4 seeds per side would settle it" in sentence
    text = "\n".join(recommended_section(_few(), 0.01, 0.95))
    assert "| 8 | 1,000 (1.82%) | 2 / 2 |" in text and "| ~4 |" in text
    assert "| too few seeds |" in text and "cannot clear" in text


def _few():
    rows = [lora(8, 0.001, s, 0.5, t, params=1000) for s, t in enumerate([0.935, 0.937])]
    rows += [lora(1, 0.001, s, 0.5, t, params=1000) for s, t in enumerate([0.90, 0.91])]
    rows += [full(0.001, s, 0.5, t) for s, t in enumerate([0.940, 0.944])]
    return table(rows)


def test_a_rank_with_as_many_parameters_as_the_full_finetune_is_never_recommended():
    # r=64 trains 67,200 parameters, more than the full finetune's 55,050: shown, never tested;
    # the sequence starts at r=32, which passes (the tight numbers above).
    tight, full_accs = [0.930, 0.931, 0.932], [0.936, 0.937, 0.938]
    result = recommendation({64: full_accs, 32: tight}, full_accs, params={64: 67200, 32: 33600})
    tests = by_rank(result)
    assert tests[64].verdict == NO_SAVING and result.rank == 32
    only = recommendation({64: full_accs}, full_accs, params={64: 67200})
    assert only.rank is None and only.tests[0].verdict == NO_SAVING
    assert only.sentence(0.01).endswith(
        "none; no rank trains fewer parameters than the full finetune"
    )
    rows = [lora(64, 0.001, s, 0.5, t, params=55050) for s, t in enumerate(full_accs)]
    rows += [full(0.001, s, 0.5, t) for s, t in enumerate(full_accs)]
    text = "\n".join(recommended_section(table(rows), 0.01, 0.95))
    assert "never: as many trainable parameters as the full finetune, or more" in text


def test_full_rank_is_marked_where_the_runs_recorded_it():
    # full_rank_at = 64 (784→64→64→10: min(out, in) is 64, 64, 10): r=64 is full rank, r=8 is
    # not; a table without the column marks none (no parameter-count guess).
    counts = {8: 8400, 64: 67200}
    rows = [lora(r, 0.001, s, 0.5, 0.9, params=p) for r, p in counts.items() for s in range(3)]
    rows += [full(0.001, s, 0.5, 0.9) for s in range(3)]
    marked = table(rows).assign(full_rank_at=64.0)
    (result,) = recommend(marked, 0.01)
    assert {t.rank: t.full_rank for t in result.tests} == {64: True, 8: False}
    assert "| 64 (full rank) |" in "\n".join(recommended_section(marked, 0.01, 0.95))
    (result,) = recommend(table(rows), 0.01)
    assert not any(t.full_rank for t in result.tests)


def test_identical_seeds_raise_no_warning_and_still_state_an_interval():
    # Collapsed on both sides: full 0.95 ×3, r=4 0.945 ×3: no spread, the interval is the gap
    # itself (0.005 < 0.01: pass). Collapsed on one side only: r=2 0.943, 0.944, 0.945
    # (mean 0.944, gap 0.006, s² = 1e-6): se = sqrt(1e-6/3) = 5.774e-4, ν = 2,
    # bound 0.006 + 2.92·5.774e-4 = 0.00769.
    with pytest.warns(RuntimeWarning, match="Precision loss"):  # what scipy's test does here
        stats.ttest_ind([0.95] * 3, [0.945] * 3, equal_var=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = recommendation({4: [0.945] * 3, 2: [0.943, 0.944, 0.945]}, [0.95] * 3)
        text = "\n".join(recommended_section(_collapsed(), 0.01, 0.95))
    tests = by_rank(result)
    assert tests[4].interval.upper == pytest.approx(0.005) and tests[4].verdict == PASS
    assert tests[4].interval.low == tests[4].interval.high == tests[4].interval.gap
    assert tests[2].interval.df == pytest.approx(2.0)
    assert tests[2].interval.upper == pytest.approx(0.006 + 2.92 * 5.7735e-4, abs=1e-5)
    assert result.rank == 2
    assert "| [0.50, 0.50] | 0.50 |" in text


def _collapsed():
    rows = [lora(4, 0.001, s, 0.5, 0.945, params=1000) for s in range(3)]
    rows += [full(0.001, s, 0.5, 0.95) for s in range(3)]
    return table(rows)


def test_welch_gap_agrees_with_scipy_where_scipy_can_run():
    full_accs, lora_accs = np.array(DEFAULT_FULL), np.array(DEFAULT_R1)
    gap = welch_gap(full_accs, lora_accs)
    one = stats.ttest_ind(full_accs, lora_accs, equal_var=False, alternative="less")
    two = stats.ttest_ind(full_accs, lora_accs, equal_var=False)
    assert gap.upper == pytest.approx(one.confidence_interval(0.95).high)
    assert (gap.low, gap.high) == pytest.approx(tuple(two.confidence_interval(0.95)))
    assert math.isnan(welch_gap(full_accs, lora_accs[:1]).upper)  # one seed: no spread known


def test_diverged_runs_are_excluded_from_the_verdict():
    # r=4's third seed diverged: the test runs on its two finished seeds (too few), never on
    # the diverged accuracy.
    rows = [lora(4, 0.001, s, 0.5, 0.93, params=1000) for s in (0, 1)]
    rows += [lora(4, 0.001, 2, 0.1, 0.1, status="diverged", params=1000)]
    rows += [full(0.001, s, 0.5, 0.935 + 0.001 * s) for s in range(3)]
    (result,) = recommend(table(rows), 0.01)
    assert result.tests[0].seeds == (2, 3) and result.tests[0].verdict == FEW_SEEDS
    assert result.tests[0].mean == pytest.approx(0.93)


def test_the_result_type_accepts_diverged_and_refuses_an_unknown_status():
    assert not RunResult("r", "lora", status="diverged").ok
    with pytest.raises(ValueError, match="status 'exploded' is not one of"):
        RunResult("r", "lora", status="exploded")


# Settled or not (sweep.seeds=auto stops on it), tolerance 1 point. The full finetune:
# mean 0.900, s = 0.001. A tight rank at 0.899 (s = 0.001): gap 0.1 point, se = 0.00082,
# upper ≈ 0.1 + 2.13·0.082 = 0.27 point < 1: a settled pass. A rank at 0.800: gap 10 points,
# lower ≈ 9.8 > 1: a settled fail. A noisy rank at 0.90 ± 0.05: se ≈ 2.9 points, so the
# interval [−6, +6] holds the tolerance: unsettled.
SETTLE_FULL = [0.900, 0.901, 0.899]
TIGHT, NOISY, FAR = [0.899, 0.900, 0.898], [0.90, 0.85, 0.95], [0.800, 0.801, 0.799]


def test_a_rank_is_settled_when_its_interval_clears_the_tolerance_on_one_side():
    result = recommendation({16: TIGHT, 8: NOISY, 4: FAR}, SETTLE_FULL)
    tests = by_rank(result)
    assert settlement(tests[16], 0.01) == SETTLED_PASS
    assert tests[16].interval.upper < 0.01 < tests[8].interval.upper
    assert settlement(tests[8], 0.01) == UNSETTLED and tests[8].interval.lower < 0.01
    assert settlement(tests[4], 0.01) == SETTLED_FAIL and tests[4].interval.lower > 0.01
    # the lower bound mirrors the upper one around the gap
    assert tests[4].interval.lower == pytest.approx(
        tests[4].interval.gap - (tests[4].interval.upper - tests[4].interval.gap)
    )
    assert settlement(by_rank(recommendation({4: TIGHT[:2]}, SETTLE_FULL))[4], 0.01) == UNSETTLED


def test_the_unsettled_ranks_run_down_the_sequence_to_the_first_settled_fail():
    ranks = {32: TIGHT, 16: NOISY, 8: TIGHT, 4: NOISY, 2: FAR, 1: NOISY}
    result = recommendation(ranks, SETTLE_FULL)
    assert unsettled_ranks(result, 0.01) == (16, 4)  # r=1 waits behind r=2's settled fail
    assert unsettled_ranks(recommendation({8: TIGHT, 4: FAR}, SETTLE_FULL), 0.01) == ()
    section = "\n".join(recommended_section(table_of(ranks), 0.01, 0.95))
    assert "| settled |" in section and "*Settled*" in section


def _false_passes(confidence: float, trials: int = 1500) -> float:
    """How often a rank whose true gap equals the tolerance (1 point) passes at some look of
    an auto study that adds one seed a side from 3 to 10 and stops at the first pass
    (spread 0.4 points a run; a fixed random stream, so the figure is reproducible)."""
    generator = np.random.default_rng(0)
    passed = 0
    for _ in range(trials):
        full = generator.normal(0.95, 0.004, 10)
        lora = generator.normal(0.94, 0.004, 10)  # 1 point below: not non-inferior
        passed += any(welch_gap(full[:n], lora[:n], confidence).upper < 0.01 for n in range(3, 11))
    return passed / trials


def test_auto_seeds_keep_the_false_pass_rate_at_5_percent():
    """Looking after every added seed at 95% each lets a rank at the margin through far more
    than 5% of the time; the auto study's level, 95% split over its 8 looks, does not."""
    assert study_confidence(False, 10) == 0.95
    assert study_confidence(True, 10) == pytest.approx(1 - 0.05 / 8)
    assert _false_passes(0.95) > 0.08
    assert _false_passes(study_confidence(True, 10)) <= 0.05


def test_an_auto_studys_report_names_its_level():
    rows = [full(1e-3, s, 0.9, 0.950 + d) for s, d in enumerate((0.0, 0.001, -0.001))]
    rows += [lora(8, 1e-3, s, 0.9, 0.948 + d, params=100) for s, d in enumerate((0, 1e-3, -1e-3))]
    level = study_confidence(True, 10)
    text = "\n".join(recommended_section(table(rows), 0.01, level))
    assert "one-sided 99.38% (95% split over the looks of `sweep.seeds=auto`)" in text
    (recommendation,) = recommend(table(rows), 0.01, level)
    assert "one-sided 99.38% upper bound" in recommendation.sentence(0.01)


def test_seeds_of_different_alphas_are_never_pooled():
    """With an α grid, each rank is tested at the α that validation prefers, its seeds only."""
    rows = [full(1e-3, s, 0.9, 0.950 + d) for s, d in enumerate((0.0, 0.001, -0.001))]
    for s, d in enumerate((0.0, 0.001, -0.001)):
        good = lora(8, 1e-3, s, 0.92, 0.949 + d, params=100)
        bad = {**lora(8, 1e-3, s, 0.80, 0.900 + d, params=100), "alpha": 1}
        rows += [good, bad]
    (recommendation,) = recommend(table(rows), 0.01)
    (test,) = recommendation.tests
    assert test.seeds == (3, 3) and test.mean == pytest.approx(0.949)
