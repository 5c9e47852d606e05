"""The computed "Claims" section: each variant against plain LoRA at its tuned learning rate."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from lora_lab.report import claims
from lora_lab.report.curves import CURVES_FILE, CURVES_FILE_COLUMNS
from lora_lab.report.markdown import write_report
from tests.report.fakes import write_study
from tests.report.methods_fakes import method_curves, methods_results


def test_welch_contrast_matches_scipys_welch_interval() -> None:
    a, b = np.array([0.81, 0.83, 0.84, 0.80]), np.array([0.78, 0.79, 0.75])
    estimate = claims.welch_contrast([(1.0, a), (-1.0, b)])
    interval = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert estimate.value == pytest.approx(a.mean() - b.mean())
    assert (estimate.low, estimate.high) == pytest.approx((interval.low, interval.high))
    one_sided = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
    assert one_sided.confidence_interval(0.95).low == pytest.approx(estimate.lower)


def test_each_claim_gets_the_verdict_its_data_supports() -> None:
    df = methods_results()
    runs = claims.run_values(df, method_curves(df))
    assert set(runs["learning_rate"]) == {1e-2}  # the learning rate chosen on validation only
    verdicts = {c.method: claims.judge_claim(c, runs, 0.01) for c in claims.CLAIMS}
    dora = verdicts["dora"]
    assert dora.verdict == claims.HOLDS
    assert [p.ranks for p in dora.parts] == [(1, 4), (1, 4, 16, 64)]
    assert dora.parts[0].estimate.value == pytest.approx(0.03)
    assert dora.parts[1].estimate.value == pytest.approx(0.03)  # 3 points low, 0 high
    assert dora.parts[0].seeds == (3, 3)
    rslora = verdicts["rslora"]
    assert rslora.verdict == claims.FAILS  # equal: its bound is far below the 1-point margin
    assert rslora.parts[0].ranks == (16, 64) and rslora.parts[0].state == claims.REFUTED
    assert verdicts["pissa"].verdict == claims.HOLDS  # +5 points of AUC on average
    assert verdicts["pissa"].parts[0].estimate.value == pytest.approx(0.05)
    assert verdicts["loraplus"].verdict == claims.OPEN  # too noisy either way


def test_not_significant_is_never_holds_nor_fails() -> None:
    df = methods_results()
    lora = (df["method"] == "rslora") & (df["rank"] >= 16)
    # +1 point on average but seeds from -5 to +7 points: neither shown nor refuted.
    df.loc[lora, "test_acc"] += np.tile([-0.05, 0.01, 0.07], lora.sum() // 3)
    runs = claims.run_values(df, pd.DataFrame())
    result = claims.judge_claim(claims.CLAIMS[1], runs, 0.01)
    assert result.verdict == claims.OPEN and result.parts[0].state == claims.UNDECIDED


def test_speed_claims_without_curves_are_inconclusive_and_say_why() -> None:
    runs = claims.run_values(methods_results(), pd.DataFrame())
    result = claims.judge_claim(claims.CLAIMS[2], runs, 0.01)
    assert result.verdict == claims.OPEN and "no validation curves" in result.reason


def test_tuned_learning_rate_table_has_one_cell_per_method_and_rank() -> None:
    table = claims.tuned_lr_table(methods_results())
    assert list(table.columns) == ["method", "r=1", "r=4", "r=16", "r=64", "full finetune"]
    assert table.set_index("method").loc["dora", "r=16"] == "0.01*"  # top of a 2-value grid
    assert table.set_index("method").loc["full finetune", "full finetune"] == "0.001*"


def test_report_has_a_claims_section_and_commits_the_curves(tmp_path) -> None:
    df = methods_results()
    study = write_study(tmp_path / "methods", df)
    text = write_report(study).read_text()
    section = text.split("## Claims", 1)[1].split("\n## ", 1)[0]
    for claim in claims.CLAIMS:
        assert claim.text in section
    assert "| DoRA helps most at low rank | **holds** |" in section
    assert "Learning rate chosen on validation" in section
    curves = pd.read_csv(study / CURVES_FILE)
    assert list(curves.columns) == CURVES_FILE_COLUMNS
    finetune = df[df["stage"] != "pretrain"]
    assert set(curves["run_id"]) == set(finetune["run_id"])
    assert curves.groupby("run_id").size().eq(4).all()  # every epoch of every run
    assert curves["selected"].sum() == 4 * (3 + 5 * 4 * 3)
    # A committed folder has no logs: the report keeps its curves.csv and its claims.
    shutil.rmtree(study / "runs")
    again = write_report(study).read_text()
    assert "| DoRA helps most at low rank | **holds** |" in again
    assert pd.read_csv(study / CURVES_FILE).equals(curves)


def test_a_single_method_study_has_no_claims_section(tmp_path, results) -> None:
    study = write_study(tmp_path / "one", results)
    assert "## Claims" not in write_report(study).read_text()
