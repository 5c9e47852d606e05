"""Learning rates chosen on validation only: edges, ties and diverged runs."""

from __future__ import annotations

import math

import pandas as pd

from lora_lab.report.selection import chosen_learning_rates, selected_mask, tuned_rows
from lora_lab.results import COLUMNS as RESULT_COLUMNS
from lora_lab.results import normalize_results


def table(rows: list[dict]) -> pd.DataFrame:
    """A results table from the columns that matter (status `ok` unless given), the others
    blank."""
    frame = pd.DataFrame(rows)
    for column in RESULT_COLUMNS:
        if column not in frame:
            text = column in ("per_class_acc", "run_dir", "pass", "error", "method", "selected")
            frame[column] = "" if text else math.nan
    frame["status"] = frame["status"].replace("", "ok") if "status" in rows[0] else "ok"
    frame["run_id"] = [f"run{i}" for i in range(len(frame))]
    frame["trainable_params"] = frame["trainable_params"].fillna(1000)
    return normalize_results(frame)


def lora(
    rank: int,
    lr: float,
    seed: int,
    val: float,
    test: float,
    method: str = "default",
    status: str = "",
    params: float = math.nan,
):
    return {"stage": "lora", "method": method, "rank": rank, "alpha": rank, "seed": seed,
            "learning_rate": lr, "val_acc": val, "test_acc": test, "status": status,
            "trainable_params": params}  # fmt: skip


def full(lr: float, seed: int, val: float, test: float):
    return {"stage": "full_finetune", "seed": seed, "learning_rate": lr, "val_acc": val,
            "test_acc": test, "trainable_params": 55050, "status": ""}  # fmt: skip


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
    assert "a bound, not an optimum (the best learning rate may lie above it)" in text


def test_ties_within_one_standard_error_are_reported_and_the_best_mean_still_chosen():
    # lr=0.001: val 0.900, 0.910, 0.920 (mean 0.910, s² = 1e-4); lr=0.003: 0.905, 0.915, 0.925
    # (mean 0.915, s² = 1e-4); se of the difference = sqrt(1e-4/3 + 1e-4/3) = 0.00816 ≥ 0.005:
    # tied. lr=0.01: mean 0.810, 0.105 below: not tied.
    vals = {0.001: (0.900, 0.910, 0.920), 0.003: (0.905, 0.915, 0.925), 0.01: (0.80, 0.81, 0.82)}
    rows = [lora(4, lr, s, val=v, test=0.9) for lr, vs in vals.items() for s, v in enumerate(vs)]
    (choice,) = chosen_learning_rates(table(rows)).to_dict("records")
    assert choice["learning_rate"] == 0.003 and choice["ties"] == [0.001]
    from lora_lab.report.markdown import _learning_rate_section

    text = "\n".join(_learning_rate_section(table(rows)))
    assert "**Tie:** lora default r=4: lr=0.001 within one standard error" in text
    assert "the best mean, lr=0.003, is the choice" in text
    # 0.905 vs 0.915 on single seeds: no spread to compare with, so no tie is claimed
    single = [lora(4, 0.001, 0, 0.905, 0.9), lora(4, 0.003, 0, 0.915, 0.9)]
    assert chosen_learning_rates(table(single))["ties"].tolist() == [[]]


def test_diverged_runs_never_win_a_choice_and_are_counted():
    # lr=0.01: two finished seeds with val 0.95 and one diverged; lr=0.003: three seeds at 0.90.
    # The survivors' mean (0.95) would flatter lr=0.01: lr=0.003 is chosen.
    rows = [lora(4, 0.01, s, val=0.95, test=0.95) for s in (0, 1)]
    rows += [lora(4, 0.01, 2, val=0.1, test=0.1, status="diverged")]
    rows += [lora(4, 0.003, s, val=0.90, test=0.90) for s in range(3)]
    rows += [full(0.001, s, val=0.9, test=0.9) for s in range(3)]
    df = table(rows)
    chosen = chosen_learning_rates(df).set_index("stage")
    assert chosen.loc["lora", "learning_rate"] == 0.003 and chosen.loc["lora", "diverged"] == 1
    assert not selected_mask(df)[df["status"] == "diverged"].any()
    from lora_lab.report.tables import summary_table

    summary = summary_table(df).set_index(["stage", "learning_rate"])
    assert summary.loc[("lora", 0.01), ["n_seeds", "failed", "diverged"]].tolist() == [2, 1, 1]
    assert summary.loc[("lora", 0.003), "diverged"] == 0
    # every learning rate diverged somewhere: the best surviving mean is chosen all the same
    rows[3]["status"] = "diverged"
    assert (
        chosen_learning_rates(table(rows)).set_index("stage").loc["lora", "learning_rate"] == 0.01
    )


def test_an_edge_choice_says_when_the_step_past_it_diverged():
    rows = [lora(4, lr, s, val=0.8 + lr, test=0.8) for lr in (0.001, 0.01) for s in range(2)]
    rows += [lora(4, 0.1, s, val=0.2, test=0.2, status="diverged") for s in range(2)]
    (row,) = chosen_learning_rates(table(rows)).itertuples()
    assert row.at_edge and row.learning_rate == 0.01 and row.failed_lrs == [0.1]
