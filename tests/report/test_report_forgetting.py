"""Fit and forgetting apart, the verdict judged on fit, confusion matrices and per_class.png
of the configurations chosen on validation. Numbers checked by hand in the comments."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.report import confusion, forgetting, per_class
from lora_lab.report.markdown import write_report
from lora_lab.report.verdict import recommend
from tests.report.fakes import assert_png
from tests.report.test_report_selection import full, lora, table

FINETUNE, OTHERS = ["A", "B"], ["C", "D"]


def _classes(row: dict, accuracies: dict[str, float], trained: list[str]) -> dict:
    return {**row, "per_class_acc": json.dumps(accuracies), "train_classes": json.dumps(trained)}


def pretrain(accuracies: dict[str, float]) -> dict:
    row = {"stage": "pretrain", "seed": 0, "learning_rate": 0.001, "test_acc": 0.7}
    return _classes(row, accuracies, FINETUNE + OTHERS)


def forgetting_study() -> pd.DataFrame:
    """Finetuned on A and B, tested on A–D. The full finetune fits best (0.95) and forgets most
    (C and D fall from 0.9 to 0.1); LoRA r=4 fits 0.90 and keeps C and D near 0.8. On the whole
    test set (test_acc, the mean of the four) LoRA leads: 0.85 against 0.525."""
    rows = [pretrain({"A": 0.5, "B": 0.5, "C": 0.9, "D": 0.9})]
    for seed in range(3):
        accs = {"A": 0.95, "B": 0.95, "C": 0.1, "D": 0.1}
        rows.append(_classes(full(0.001, seed, 0.95, 0.525), accs, FINETUNE))
        accs = {"A": 0.90, "B": 0.90, "C": 0.80 + 0.01 * seed, "D": 0.80}
        rows.append(_classes(lora(4, 0.001, seed, 0.90, 0.85, params=1000), accs, FINETUNE))
    return table(rows)


def test_fit_and_forgetting_are_measured_apart_with_intervals():
    df = forgetting_study()
    split = forgetting.class_split(df)
    assert split == forgetting.ClassSplit(("A", "B"), ("C", "D"))
    rows = forgetting.forgetting_table(df, split).set_index("model")
    assert list(rows.index) == ["before finetuning", "full finetune", "LoRA r=4"]
    assert rows.loc["full finetune", "fit"] == pytest.approx(0.95)
    # Full finetune: C and D at 0.1 on every seed: a drop of 0.9 − 0.1 = 0.8, no spread.
    assert rows.loc["full finetune", "drop"] == pytest.approx(0.8)
    assert rows.loc["full finetune", "drop_low"] == pytest.approx(0.8)
    # LoRA: other = 0.800, 0.805, 0.810 (mean 0.805, s = 0.005): drop 0.095, and with one
    # pretrained network (a fixed point) ± t(0.975, 2)·s/√3 = 4.3027·0.0028868 = 0.012421.
    assert rows.loc["LoRA r=4", "drop"] == pytest.approx(0.095)
    assert rows.loc["LoRA r=4", "drop_low"] == pytest.approx(0.095 - 0.012421, abs=1e-6)
    assert rows.loc["LoRA r=4", "drop_high"] == pytest.approx(0.095 + 0.012421, abs=1e-6)
    text = "\n".join(forgetting.forgetting_section(df))
    assert (
        "| LoRA r=4 | 3 | 0.9000 [0.9000, 0.9000] | 0.8050 [0.7926, 0.8174] | 9.50 [8.26, 10.74] |"
        in text
    )
    assert "| C | 0.900 | 0.100 | 0.810 |" in text  # the per-class table, C's mean per model


def test_the_verdict_is_judged_on_fit_and_says_so():
    # On test_acc LoRA leads by 32.5 points and would be recommended; on fit it is 5 points
    # below the full finetune (0.95 − 0.90), far above the 1-point tolerance: none.
    (result,) = recommend(forgetting_study(), 0.01)
    assert result.rank is None and result.full_mean == pytest.approx(0.95)
    assert result.tests[0].interval.gap == pytest.approx(0.05)
    sentence = result.sentence(0.01)
    assert sentence.startswith(
        "recommended rank (judged on fit: test accuracy on the 2 finetune classes, as "
        "validation measures it; forgetting of the other 2 is reported under Fit and "
        "forgetting, not judged): none;"
    )


def test_a_study_tested_on_its_finetune_classes_only_has_no_forgetting_section():
    df = forgetting_study()
    df["train_classes"] = json.dumps(FINETUNE + OTHERS)
    assert forgetting.class_split(df) is None
    assert forgetting.forgetting_section(df) == []
    (result,) = recommend(df, 0.01)
    assert result.measure == "" and result.rank == 4  # judged on test_acc, as before


def default_study(full_rank_at: float | None) -> pd.DataFrame:
    """The default study's shape: r=64 trains more than the full finetune (never tested), r=32
    fails; 784→64→64→10 is full rank at r = 64."""
    rows = [full(0.003, s, 0.5, t) for s, t in enumerate([0.960, 0.959, 0.957])]
    for rank, accs in {64: [0.947, 0.944, 0.950], 32: [0.949, 0.949, 0.943]}.items():
        rows += [lora(rank, 0.01, s, 0.5, t, params=1050 * rank) for s, t in enumerate(accs)]
    frame = table(rows)
    frame["full_rank_at"] = [full_rank_at if stage == "lora" else None for stage in frame.stage]
    return frame


def test_a_full_rank_largest_rank_still_below_says_the_gap_is_not_a_rank_limit():
    # r=64: gap 0.9587 − 0.9470 = 1.17 points, above the tolerance with 3 seeds a side.
    (result,) = recommend(default_study(64), 0.01)
    sentence = result.sentence(0.01)
    assert result.rank is None and result.tests[0].full_rank
    assert sentence.endswith(
        "; r=64, full rank in every adapted layer (r ≥ min(in, out) of each), is still 1.17 "
        f"points below (one-sided 95% upper bound {100 * result.tests[0].interval.upper:.2f}), "
        "so the gap is not a rank limit"
    )
    for not_full in (128, None):  # a layer wider than 64, or a table without the column
        (result,) = recommend(default_study(not_full), 0.01)
        assert not result.tests[0].full_rank and "rank limit" not in result.sentence(0.01)


def test_per_class_uses_the_learning_rate_and_the_best_lora_chosen_on_validation():
    before = {"A": 0.5, "B": 0.5}
    rows = [pretrain(before)]
    for seed in range(2):  # lr=0.01 wins on validation; lr=0.001 would look better on test
        rows.append({**full(0.001, seed, 0.80, 0.95), "per_class_acc": json.dumps({"A": 0.95})})
        rows.append({**full(0.01, seed, 0.90, 0.85), "per_class_acc": json.dumps({"A": 0.85})})
        for rank in (1, 2, 4, 8, 16):  # r=2 best on validation, r=16 on test
            val, test = (0.95, 0.7) if rank == 2 else (0.8, 0.6 + rank / 100)
            row = lora(rank, 0.001, seed, val, test, params=100 * rank)
            rows.append({**row, "per_class_acc": json.dumps({"A": test})})
    df = table(rows)
    result = per_class.per_class_table(df)
    assert list(dict.fromkeys(result["model"])) == [
        "before finetuning", "full finetune", "best LoRA r=2",
    ]  # fmt: skip
    assert set(result.loc[result["model"] == "full finetune", "accuracy"]) == {0.85}
    assert set(result.loc[result["model"] == "best LoRA r=2", "accuracy"]) == {0.7}


def test_per_class_drops_a_before_series_of_zeros_and_its_repeating_panel(tmp_path: Path):
    rows = [pretrain({"A": 0.0, "B": 0.0})]  # a task shift: the classes are new to it
    rows += [{**full(0.001, s, 0.9, 0.9), "per_class_acc": json.dumps({"A": 0.9, "B": 0.8})} for s in range(2)]  # fmt: skip
    df = table(rows)
    assert "before finetuning" not in set(per_class.per_class_table(df)["model"])
    fig = per_class.draw_per_class(df)
    assert len(fig.axes) == 1  # no change panel: it would repeat the accuracies
    assert "before" not in fig._suptitle.get_text()


def confusion_cell(counts: list[list[int]]) -> str:
    names = ["A", "B"]
    return json.dumps({"predicted": names, "counts": dict(zip(names, counts, strict=True))})


def test_confusion_matrices_of_the_chosen_configurations(tmp_path: Path):
    rows = [{**pretrain({"A": 0.5, "B": 0.5}), "confusion": confusion_cell([[5, 5], [5, 5]])}]
    for seed in range(2):
        rows.append({**full(0.001, seed, 0.9, 0.9), "confusion": confusion_cell([[9, 1], [seed, 10 - seed]])})  # fmt: skip
        for rank, val in ((1, 0.7), (4, 0.8)):  # r=4 best on validation
            row = lora(rank, 0.001, seed, val, 0.9 - val / 10, params=100 * rank)
            rows.append({**row, "confusion": confusion_cell([[rank, 10 - rank], [0, 10]])})
    df = table(rows)
    chosen = confusion.chosen_confusions(df)
    assert list(chosen) == ["before finetuning", "full finetune", "best on validation: LoRA r=4"]
    matrix, runs = chosen["full finetune"]
    assert runs == 2 and matrix.loc["B"].tolist() == [1, 19]  # summed over the two seeds
    written = confusion.write_confusion(df, tmp_path)
    assert_png(written)
    saved = pd.read_csv(tmp_path / "confusion.csv")
    share = saved.query("model == 'full finetune' and true == 'B' and predicted == 'B'")["share"]
    assert share.item() == pytest.approx(0.95)
    # a table without confusion counts removes what an earlier report left
    assert confusion.write_confusion(df.assign(confusion=""), tmp_path) is None
    assert not (tmp_path / "confusion.csv").exists()


def test_the_report_has_the_fit_and_forgetting_section(tmp_path: Path):
    forgetting_study().to_csv(tmp_path / "results.csv", index=False)
    report = write_report(tmp_path).read_text()
    assert "## Fit and forgetting" in report
    assert report.index("## Recommended rank") < report.index("## Fit and forgetting")
    assert "| rank | trainable params | seeds (LoRA / full) | fit |" in report
