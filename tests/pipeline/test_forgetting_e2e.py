"""A tiny study that finetunes on three classes and tests on all ten: what it records per run
(confusion matrix, trained classes, full rank) and what its report and last line make of it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from lora_lab.cli import main
from lora_lab.report.confusion import CONFUSION_CSV, CONFUSION_PNG
from lora_lab.results import parse_confusion, read_results
from tests.pipeline.study_config import tiny_study_overrides

TOPS = ["Pullover", "Coat", "Shirt"]  # label order: 2, 4, 6


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("forgetting")
    out = folder / "study"
    overrides = [
        *tiny_study_overrides(folder),
        f"output_dir={out}",
        "sweep.ranks=[1,64]",
        "data.test_classes=all",
        "stages.full_finetune.classes=[Shirt,Pullover,Coat]",
        "stages.lora.classes=[Shirt,Pullover,Coat]",
    ]
    assert main(["sweep", *overrides]) == 0
    return out


def test_every_run_records_its_confusion_matrix_and_trained_classes(study):
    out = study
    table = read_results(out / "results.csv")
    assert (table["status"] == "ok").all()
    for _, row in table.iterrows():
        counts = parse_confusion(row["confusion"], row["run_id"])
        assert counts is not None and counts.shape == (10, 10)
        per_class = json.loads(row["per_class_acc"])
        # the diagonal over the row sums is the per-class accuracy the run also records
        for name, accuracy in per_class.items():
            total = counts.loc[name].sum()
            if total:
                assert counts.loc[name, name] / total == pytest.approx(accuracy, abs=1e-6)
        assert counts.to_numpy().sum() == 100  # every test image of the fake data, once
        trained = json.loads(row["train_classes"])
        assert trained == (TOPS if row["stage"] != "pretrain" else list(per_class))
    assert list(table["stage"]) == ["pretrain", "full_finetune", "lora", "lora"]


def test_full_rank_at_is_recorded_where_the_adapter_is_built(study):
    out = study
    table = read_results(out / "results.csv").set_index("run_id")
    # all-linear on 784→64→64→10: min(out, in) is 64, 64 and 10, so r ≥ 64 is full rank
    assert table.loc["lora_r1_a1_s0", "full_rank_at"] == 64
    assert table.loc["lora_r64_a64_s0", "full_rank_at"] == 64
    assert pd.isna(table.loc["full_finetune", "full_rank_at"])


def test_the_report_measures_fit_and_forgetting_and_draws_the_confusion(study):
    out = study
    report = (out / "report.md").read_text()
    assert "## Fit and forgetting" in report
    assert "judged on fit: test accuracy on the 3 finetune classes" in report
    assert (out / CONFUSION_PNG).is_file()
    confusion = pd.read_csv(out / CONFUSION_CSV)
    assert set(confusion["model"]) == {
        "before finetuning", "full finetune", "best on validation: LoRA r=1",
    } or set(confusion["model"]) == {
        "before finetuning", "full finetune", "best on validation: LoRA r=64",
    }  # fmt: skip
    assert len(confusion) == 3 * 100
    # the study's last line is the verdict the report gives, named by what it judges
    last = (out / "lora-lab.log").read_text().strip().splitlines()[-1]
    assert "recommended rank (judged on fit: test accuracy on the 3 finetune classes" in last
