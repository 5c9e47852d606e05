"""per_class.png: before finetuning, full finetune and LoRA per class, and each one's change."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_lab.report import per_class
from tests.report.fakes import CLASSES, assert_png, make_results


def _accuracy(df: pd.DataFrame, stage: str, name: str) -> float:
    rows = df[df["stage"] == stage]["per_class_acc"]
    return float(np.mean([json.loads(text)[name] for text in rows]))


def test_few_lora_configurations_are_each_drawn_in_rank_colours() -> None:
    df = make_results(ranks=(1, 4, 8))
    table = per_class.per_class_table(df)
    models = ["before finetuning", "full finetune", "LoRA r=1", "LoRA r=4", "LoRA r=8"]
    assert list(dict.fromkeys(table["model"])) == models
    fig = per_class.draw_per_class(df)
    top = fig.axes[0]
    colours = [tuple(container.patches[0].get_facecolor()) for container in top.containers]
    assert len(colours) == len(set(colours)) == 5


def test_the_lower_panel_shows_each_class_change_from_before_finetuning() -> None:
    df = make_results(ranks=(1, 4))
    fig = per_class.draw_per_class(df)
    assert len(fig.axes) == 2
    below = fig.axes[1]
    assert below.get_ylabel() == "change from before finetuning"
    # One bar group per model after finetuning, in order; bars in class order.
    full = [patch.get_height() for patch in below.containers[0].patches]
    expected = [
        _accuracy(df, "full_finetune", name) - _accuracy(df, "pretrain", name) for name in CLASSES
    ]
    assert full == pytest.approx(expected)
    assert len(below.containers) == 3  # full finetune, LoRA r=1, LoRA r=4


def test_many_lora_configurations_show_only_the_best_on_validation() -> None:
    df = make_results()
    df["val_acc"] = df["test_acc"]
    models = per_class.per_class_table(df)["model"]
    assert list(dict.fromkeys(models))[2:] == ["best LoRA r=16"]
    # without validation accuracy nothing chooses a LoRA configuration (test data never does)
    models = per_class.per_class_table(make_results())["model"]
    assert list(dict.fromkeys(models)) == ["before finetuning", "full finetune"]


def test_without_a_pretrain_row_there_is_no_change_panel(tmp_path: Path) -> None:
    df = make_results(ranks=(1, 4))
    df.loc[df["stage"] == "pretrain", "per_class_acc"] = "{}"
    fig = per_class.draw_per_class(df)
    assert len(fig.axes) == 1
    assert_png(per_class.plot_per_class(df, tmp_path / "per_class.png"))
