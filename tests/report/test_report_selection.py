"""Which rank? Learning rates chosen on validation only, and the recommended rank's test."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from lora_lab.report.selection import (
    chosen_learning_rates,
    recommend,
    selected_mask,
    tuned_rows,
)
from lora_lab.results import COLUMNS as RESULT_COLUMNS
from lora_lab.results import normalize_results


def table(rows: list[dict]) -> pd.DataFrame:
    """A results table from the columns that matter, the others blank."""
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            text = column in ("per_class_acc", "run_dir", "pass", "error", "method", "selected")
            frame[column] = "" if text else math.nan
    frame["status"] = "ok"
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    frame["trainable_params"] = frame["trainable_params"].fillna(1000)
    return normalize_results(frame)


def lora(rank: int, lr: float, seed: int, val: float, test: float, method: str = "default"):
    return {"stage": "lora", "method": method, "rank": rank, "alpha": rank, "seed": seed,
            "learning_rate": lr, "val_acc": val, "test_acc": test}  # fmt: skip


def full(lr: float, seed: int, val: float, test: float):
    return {"stage": "full_finetune", "seed": seed, "learning_rate": lr, "val_acc": val,
            "test_acc": test, "trainable_params": 55050}  # fmt: skip


def test_the_learning_rate_is_chosen_on_validation_never_on_test():
    # At rank 4, lr=0.01 is best on validation, lr=0.001 on test: validation decides.
    rows = [lora(4, 0.001, s, val=0.80, test=0.95) for s in range(3)]
    rows += [lora(4, 0.01, s, val=0.90, test=0.85) for s in range(3)]
    rows += [full(0.001, s, val=0.9, test=0.9) for s in range(3)]
    df = table(rows)
    chosen = chosen_learning_rates(df).set_index("stage")
    assert chosen.loc["lora", "learning_rate"] == 0.01
    tuned, is_tuned = tuned_rows(df)
    assert is_tuned
    assert tuned[tuned.stage == "lora"]["test_acc"].tolist() == [0.85, 0.85, 0.85]
    assert selected_mask(df).sum() == 6  # the three lr=0.01 LoRA rows and the three baselines


def test_a_choice_at_the_edge_of_the_grid_is_flagged():
    rows = [lora(2, lr, 0, val=0.5 + lr, test=0.5) for lr in (0.001, 0.003, 0.01)]
    rows += [
        lora(8, lr, 0, val=v, test=0.5) for lr, v in ((0.001, 0.6), (0.003, 0.7), (0.01, 0.65))
    ]
    chosen = chosen_learning_rates(table(rows)).set_index("rank")
    assert chosen.loc[2, "learning_rate"] == 0.01 and chosen.loc[2, "at_edge"]
    assert chosen.loc[8, "learning_rate"] == 0.003 and not chosen.loc[8, "at_edge"]


def test_the_report_warns_about_the_edge(tmp_path):
    from lora_lab.report.markdown import _learning_rate_section

    rows = [lora(2, lr, s, val=0.5 + lr, test=0.5) for lr in (0.001, 0.003, 0.01) for s in (0, 1)]
    text = "\n".join(_learning_rate_section(table(rows)))
    assert "At the edge of the grid:** lora default r=2: lr=0.01 is the grid's largest" in text


def recommendation(ranks: dict[int, list[float]], baseline: list[float], tolerance=0.01):
    rows = [
        lora(r, 0.001, s, val=0.5, test=t) for r, accs in ranks.items() for s, t in enumerate(accs)
    ]
    rows += [full(0.001, s, val=0.5, test=t) for s, t in enumerate(baseline)]
    (result,) = recommend(table(rows), tolerance)
    return result


def test_the_t_test_decides_on_numbers_checked_by_hand():
    # Baseline mean 0.945. r=1: 3.5 points below, r=2: 1.4 points below: out by the tolerance.
    # r=4: 0.5 points below; t = -0.005/sqrt(2·0.005²/3) = -1.2247 on 4 degrees of freedom
    # (equal variances): one-sided p = 0.1438 ≥ 0.05: recommended.
    result = recommendation(
        {1: [0.90, 0.91, 0.92], 2: [0.930, 0.931, 0.932], 4: [0.935, 0.940, 0.945]},
        baseline=[0.940, 0.945, 0.950],
    )
    assert result.rank == 4
    assert result.p_value == pytest.approx(0.1438, abs=5e-4)
    # 0.6 points below (within the tolerance), but t = -0.006/sqrt(2·0.001²/3) = -7.35, df = 4:
    # p = 0.0009, significantly below: no rank qualifies.
    strict = recommendation({2: [0.930, 0.931, 0.932]}, baseline=[0.936, 0.937, 0.938])
    assert strict.rank is None and strict.p_value == pytest.approx(0.00090, abs=1e-4)
    assert "none; no rank is both within 1 point(s)" in strict.sentence(0.01)


def test_fewer_than_three_seeds_use_the_tolerance_and_say_no_test_was_possible():
    result = recommendation({1: [0.90, 0.91], 8: [0.935, 0.937]}, baseline=[0.94, 0.944])
    assert result.rank == 8 and result.p_value is None
    assert "no t-test with 2 seed(s): within 1 point(s)" in result.sentence(0.01)
    assert "1.82% of the full finetune's 55,050" in result.sentence(0.01)


def test_recommended_rank_is_given_per_method():
    rows = [lora(r, 0.001, s, 0.5, t + 0.002 * s, m) for m, r, t in (("default", 1, 0.90),
            ("default", 4, 0.94), ("dora", 1, 0.94), ("dora", 4, 0.94)) for s in range(3)]  # fmt: skip
    rows += [full(0.001, s, 0.5, 0.94 + 0.002 * s) for s in range(3)]
    by_method = {r.method: r.rank for r in recommend(table(rows))}
    assert by_method == {"default": 4, "dora": 1}
